"""``results.csv``: one row per run, with the ``lorafit train`` command that reproduces it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shlex
from typing import Any

from lorafit.config import ONE_OFF_KEYS
from lorafit.flags import flag_name
from lorafit.report.runs import Run
from lorafit.report.tables import hardware_text

CSV_COLUMNS = (
    "run", "task", "model", "method", "rank", "target_modules", "alpha", "learning_rate", "batch_size",
    "epochs", "max_steps", "max_train_samples", "max_eval_samples", "seed", "metric", "best_metric",
    "best_epoch", "best_step", "steps", "best_metrics", "trainable_parameters", "adapter_parameters",
    "head_parameters", "total_parameters", "train_seconds", "examples_per_second", "tokens_per_second",
    "peak_memory_gib", "hardware", "precision", "lorafit_version", "command",
)


def train_command(config: dict[str, Any]) -> str:
    """The ``lorafit train`` command for a config.yaml: the settings that differ from the defaults."""
    from lorafit.config import TrainConfig

    args = ["lorafit", "train"]
    for f in dataclasses.fields(TrainConfig):
        if f.name in ONE_OFF_KEYS or f.name not in config:
            continue
        value, default = config[f.name], f.default
        if value == default or value is None:  # None with a non-None default has no flag
            continue
        flag = flag_name(f.name)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, ",".join(map(str, value))]
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(args)


def csv_rows(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        s, c = run.summary, run.config
        params = s.get("trainable_parameters") or {}
        out.append({
            "run": str(run.path),
            "task": run.task,
            "model": s.get("model") or c.get("model"),
            "method": run.method,
            "rank": c.get("rank") if run.method == "lora" else "",
            "target_modules": "+".join(run.targets) if run.targets else "",
            "alpha": c.get("alpha") if run.method == "lora" else "",
            **{k: c.get(k) for k in ("learning_rate", "batch_size", "epochs", "max_steps",
                                     "max_train_samples", "max_eval_samples", "seed")},
            "metric": s.get("metric"),
            **{k: s.get(k) for k in ("best_metric", "best_epoch", "best_step", "steps")},
            "best_metrics": json.dumps(s.get("best_metrics"), sort_keys=True),
            "trainable_parameters": params.get("trainable"),
            "adapter_parameters": params.get("adapter"),
            "head_parameters": params.get("head"),
            "total_parameters": params.get("total"),
            **{k: s.get(k) for k in ("train_seconds", "examples_per_second", "tokens_per_second",
                                     "peak_memory_gib")},
            "hardware": hardware_text(s.get("hardware")),
            "precision": s.get("precision") or c.get("precision"),
            "lorafit_version": s.get("lorafit_version"),
            "command": train_command(c),
        })
    return out


def write_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(runs):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()
