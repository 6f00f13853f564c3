"""Finished runs as the report reads them (through :class:`~lorafit.run.RunDir`), and their
grouping over seeds."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import LORA_ONLY, NOT_SETTINGS, field_defaults
from lorafit.errors import LorafitError
from lorafit.run import SUMMARY, RunDir
from lorafit.settings import freeze


@dataclass
class Run:
    """A finished run directory, as read from disk."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    targets: list[str] | None  # the LoRA target modules it trained (resolved), None for full

    @property
    def task(self) -> str:
        return str(self.summary.get("task") or self.config.get("task"))

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.config.get("method"))

    @property
    def value(self) -> float | None:
        """The best dev value of the task's metric, in %."""
        v = self.summary.get("best_metric")
        return None if v is None else 100.0 * float(v)

    @property
    def global_batch_size(self) -> int:
        """Training examples per optimizer step, over every process."""
        if self.summary.get("global_batch_size"):
            return int(self.summary["global_batch_size"])
        # A summary.json from before lorafit wrote it: the config's batch x accumulation x processes.
        config = {**field_defaults(), **self.config}
        processes = int(self.summary.get("num_processes") or 1)
        return int(config["batch_size"]) * int(config["grad_accum"] or 1) * processes

    def examples_seen_curve(self) -> list[tuple[int, float]]:
        """(training examples seen, dev metric in %) at each evaluation in metrics.jsonl.

        Examples seen is optimizer steps x the global batch size, so an epoch's last, smaller batch
        counts as a full one: the x values are exact up to one batch per epoch.
        """
        metric = self.summary.get("metric")
        return [(int(rec["step"]) * self.global_batch_size, 100.0 * float(rec[metric]))
                for rec in self.metrics if rec.get(metric) is not None and rec.get("step") is not None]

    @property
    def settings(self) -> dict[str, Any]:
        """What the run trained, without seed and execution details: equal for seeds of one configuration."""
        # Defaults first: a config.yaml written before a field existed means that field's default.
        s = {k: v for k, v in {**field_defaults(), **self.config}.items() if k not in NOT_SETTINGS}
        s["task"], s["method"] = self.task, self.method
        s["model"] = self.summary.get("model") or self.config.get("model")
        if self.method == "full":
            for k in LORA_ONLY:
                s.pop(k, None)
        else:
            s["target_modules"] = sorted(self.targets) if self.targets else None
        return s


def _resolved_targets(run_dir: Path, config: dict[str, Any]) -> list[str] | None:
    # Read leniently (not with lorafit.lora.read_adapter_config, which refuses an incomplete
    # file): only the resolved target names are wanted here, and a report must not fail on them.
    adapter_config = run_dir / "adapter" / "adapter_config.json"
    if adapter_config.is_file():
        try:
            targets = json.loads(adapter_config.read_text(encoding="utf-8")).get("target_modules")
            if isinstance(targets, list):
                return [str(t) for t in targets]
        except (json.JSONDecodeError, OSError):
            pass
    targets = config.get("target_modules")
    return list(targets) if isinstance(targets, list) else None


def load_run(run_dir: Path) -> Run | None:
    """The run in ``run_dir`` if it finished, else None."""
    run = RunDir(run_dir)
    summary = run.summary()
    if summary is None or summary.get("status") != "finished":
        return None
    try:
        config = run.config()
    except LorafitError:
        print(f"lorafit report: {run_dir}: finished but no readable config.yaml; skipped", file=sys.stderr)
        return None
    lora = summary.get("method", config.get("method")) == "lora"
    targets = _resolved_targets(run_dir, config) if lora else None
    return Run(run_dir, summary, config, run.metrics(), targets)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every finished run under ``paths`` (searched recursively), each once, in path order."""
    runs: dict[Path, Run] = {}
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise LorafitError(f"report: {root}: no such directory")
        for summary in sorted(root.rglob(SUMMARY)):
            key = summary.parent.resolve()
            if key not in runs and (run := load_run(summary.parent)) is not None:
                runs[key] = run
    if not runs:
        raise LorafitError(f"report: no finished runs (summary.json with status finished) under "
                           f"{', '.join(map(str, paths))}")
    return sorted(runs.values(), key=lambda r: str(r.path))


@dataclass
class Group:
    """The runs of one configuration on one task (they differ only by seed)."""

    settings: dict[str, Any]
    runs: list[Run]

    @property
    def task(self) -> str:
        return self.settings["task"]

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.runs if r.value is not None]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """Half the range over seeds, (max - min) / 2."""
        return (max(self.values) - min(self.values)) / 2

    @property
    def metric(self) -> str:
        return str(self.runs[0].summary.get("metric", "metric"))

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get("seed") for r in self.runs]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with the same settings (all but seed and execution details) form one group."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        if run.value is None:
            continue
        key = freeze(run.settings)
        if key in groups:
            seeds = groups[key].seeds
            if run.config.get("seed") in seeds:
                first = groups[key].runs[seeds.index(run.config.get("seed"))].path
                print(f"lorafit report: {run.path}: same settings and seed as {first}; counted once",
                      file=sys.stderr)
                continue
            groups[key].runs.append(run)
        else:
            groups[key] = Group(run.settings, [run])
    return list(groups.values())
