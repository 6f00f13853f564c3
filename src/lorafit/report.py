"""``lorafit report``: tables and plots from run directories, read from disk only.

``lorafit report DIR...`` finds every finished run under the given directories (a
``summary.json`` with ``"status": "finished"``, next to its ``config.yaml``), groups the runs that
differ only by seed, and writes to ``--output`` (default ``<first DIR>/report``):

    results.csv        one row per run: settings, best dev metric and epoch, trainable parameters,
                       train time, speed, hardware, and the ``lorafit train`` command that reproduces it
    results.md         paper-style tables (median over seeds, spread, average over tasks), with the
                       paper's RoBERTa-base rows beside them, labelled as the paper's
    rank_<task>.png    dev metric against LoRA rank (log2 axis), one line per target set
    lora_vs_full.png   LoRA against full fine-tuning per task, with trainable-parameter counts
    curves_<task>.png  dev metric over training (from metrics.jsonl), one line per configuration

Nothing is typed in by hand except the paper's numbers (:data:`PAPER_ROWS`, with their source).
The output depends only on the run directories, so running the same command again regenerates
the same files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import LorafitError
from lorafit.sweep import LORA_ONLY, VARIANT_FIELDS, distinguishing_fields, format_value, freeze

# -- the paper's numbers (data, not code) -----------------------------------------------------

PAPER_SOURCE = "Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022), Table 2"
PAPER_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 2 (GLUE dev set, in %): median over 5 seeds for LoRA."""

    label: str
    method: str
    trainable: str  # as printed in the paper (head excluded)
    values: dict[str, float]
    spread: dict[str, float] | None  # the paper's "±" (None: a single number, copied from prior work)
    average: float  # the paper's Avg over its 8 tasks


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(
        "RoB-base FT*", "full", "125.0M",
        dict(zip(PAPER_TASKS, (87.6, 94.8, 90.2, 63.6, 92.8, 91.9, 78.7, 91.2))), None, 86.4,
    ),
    PaperRow(
        "RoB-base LoRA", "lora", "0.3M",
        dict(zip(PAPER_TASKS, (87.5, 95.1, 89.7, 63.4, 93.3, 90.8, 86.6, 91.5))),
        dict(zip(PAPER_TASKS, (0.3, 0.2, 0.7, 1.2, 0.3, 0.1, 0.7, 0.2))), 87.2,
    ),
)

METRIC_LABELS = {"accuracy": "Acc", "matthews_correlation": "MCC", "pearson": "Pearson", "f1": "F1",
                 "spearmanr": "Spearman"}
# Not what a run learns: runs that differ only in these are seeds of one configuration.
NOT_SETTINGS = {"seed", "seeds", "output_dir", "overwrite", "resume", "progress", "num_threads", "save_steps",
                "log_steps", "eval_batch_size"}
CSV_COLUMNS = (
    "run", "task", "model", "method", "rank", "target_modules", "alpha", "learning_rate", "batch_size",
    "epochs", "max_steps", "max_train_samples", "max_eval_samples", "seed", "metric", "best_metric",
    "best_epoch", "best_step", "steps", "best_metrics", "trainable_parameters", "adapter_parameters",
    "head_parameters", "total_parameters", "train_seconds", "examples_per_second", "tokens_per_second",
    "peak_memory_gib", "hardware", "precision", "lorafit_version", "command",
)
PLOT_PATTERNS = ("rank_*.png", "curves_*.png", "lora_vs_full.png")


# -- runs on disk -----------------------------------------------------------------------------


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
    def settings(self) -> dict[str, Any]:
        """What the run trained, without seed and execution details: equal for seeds of one configuration."""
        # Defaults first: a config.yaml written before a field existed means that field's default.
        s = {k: v for k, v in {**_config_defaults(), **self.config}.items() if k not in NOT_SETTINGS}
        s["task"], s["method"] = self.task, self.method
        s["model"] = self.summary.get("model") or self.config.get("model")
        if self.method == "full":
            for k in LORA_ONLY:
                s.pop(k, None)
        else:
            s["target_modules"] = sorted(self.targets) if self.targets else None
        return s


def _config_defaults() -> dict[str, Any]:
    from lorafit.config import TrainConfig

    return TrainConfig().to_dict()


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    # A run resumed from an earlier checkpoint may log a step twice: keep the last.
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _resolved_targets(run_dir: Path, config: dict[str, Any]) -> list[str] | None:
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
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "finished":
        return None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        print(f"lorafit report: {run_dir}: finished but no readable config.yaml; skipped", file=sys.stderr)
        return None
    if not isinstance(config, dict):
        return None
    lora = summary.get("method", config.get("method")) == "lora"
    targets = _resolved_targets(run_dir, config) if lora else None
    return Run(run_dir, summary, config, _read_metrics(run_dir / "metrics.jsonl"), targets)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every finished run under ``paths`` (searched recursively), each once, in path order."""
    runs: dict[Path, Run] = {}
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise LorafitError(f"report: {root}: no such directory")
        for summary in sorted(root.rglob("summary.json")):
            key = summary.parent.resolve()
            if key not in runs and (run := load_run(summary.parent)) is not None:
                runs[key] = run
    if not runs:
        raise LorafitError(f"report: no finished runs (summary.json with status finished) under "
                           f"{', '.join(map(str, paths))}")
    return sorted(runs.values(), key=lambda r: str(r.path))


# -- grouping ---------------------------------------------------------------------------------




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


@dataclass
class Row:
    """A table row: one model and method (with rank, targets and distinguishing settings), per task."""

    model: str
    method: str
    rank: int | None
    targets: tuple[str, ...] | None  # sorted, for identity
    variant: tuple[tuple[str, Any], ...]
    cells: dict[str, Group] = field(default_factory=dict)  # task -> group
    target_order: list[str] | None = None  # the targets as the run named them
    kind: str = "LoRA"  # the LoRA variant's name (see lora_kind)

    @property
    def key(self) -> tuple:
        return (self.model, self.method, self.rank, self.targets, freeze(list(self.variant)), self.kind)

    @property
    def label(self) -> str:
        model = self.model.rstrip("/").rsplit("/", 1)[-1]
        text = f"{model} {'FT' if self.method == 'full' else self.kind}"
        if self.method == "lora":
            text += f" r={self.rank} ({', '.join(self.target_order or self.targets or ['default'])})"
        for name, value in self.variant:
            if value is not None:  # an option left unset (e.g. the default head) goes without saying
                text += f", {name}={format_value(value)}"
        return text

    @property
    def is_default_targets(self) -> bool:
        from lorafit.lora.config import DEFAULT_TARGET_MODULES

        defaults = {tuple(sorted(t)) for t in DEFAULT_TARGET_MODULES.values()}
        return self.targets is None or self.targets in defaults

    def trainable(self) -> str:
        """Trainable parameters as the paper counts them: adapters only for LoRA (the head is
        trained but not counted), every weight for full fine-tuning."""
        counts = []
        for group in self.cells.values():
            t = group.runs[0].summary.get("trainable_parameters") or {}
            n = t.get("adapter") if self.method == "lora" else t.get("trainable")
            if n is not None and format_count(n) not in counts:
                counts.append(format_count(n))
        return "/".join(counts) or "?"


def lora_kind(settings: dict[str, Any]) -> str:
    """A row's name for the LoRA variant its :data:`VARIANT_FIELDS` make: LoRA, rsLoRA, DoRA, PiSSA, LoRA+ x16, or their combination (rsDoRA, ...)."""
    name = "PiSSA" if settings.get("init_lora_weights") == "pissa" else "LoRA"
    if settings.get("use_dora"):
        name = "DoRA" if name == "LoRA" else f"{name}-DoRA"
    if settings.get("use_rslora"):
        name = "rs" + name
    if settings.get("loraplus_lr_ratio"):
        name += f"+ x{format_value(settings['loraplus_lr_ratio'])}"
    if settings.get("init_lora_weights") == "gaussian":
        name += " (gaussian init)"
    return name


def format_count(n: int | float) -> str:
    """Parameter counts like the paper (125.0M, 0.3M), with K below 0.1M so small ones stay visible."""
    if n >= 1e5:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


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


def build_rows(groups: list[Group]) -> list[Row]:
    """Rows of model x method x rank x targets (plus any setting that tells two groups of the
    same task apart, e.g. a swept learning rate), with one group per task."""
    def base(g: Group) -> tuple:
        s = g.settings
        targets = tuple(s["target_modules"]) if s.get("target_modules") else None
        return (s["model"], s["method"], s.get("rank") if s["method"] == "lora" else None, targets)

    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for g in groups:
        buckets.setdefault((*base(g), g.task), []).append(g.settings)
    extra = distinguishing_fields(
        buckets.values(), ignore=("task", "model", "method", "rank", "target_modules", *VARIANT_FIELDS))
    rows: dict[tuple, Row] = {}
    for g in groups:
        model, method, rank, targets = base(g)
        variant = tuple((f, freeze(g.settings.get(f))) for f in extra if f in g.settings)
        kind = lora_kind(g.settings) if method == "lora" else "FT"
        row = Row(model, method, rank, targets, variant, target_order=g.runs[0].targets, kind=kind)
        row = rows.setdefault(row.key, row)
        row.cells[g.task] = g
    return sorted(rows.values(), key=_row_order)


def _row_order(row: Row) -> tuple:
    # Numbers in numeric order (1e-05 before 0.0001), anything else as text.
    variant = tuple((name, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
                    for name, v in row.variant)
    return (row.model, row.method != "full", not row.is_default_targets, row.targets or (), row.rank or 0,
            row.kind != "LoRA", row.kind, variant)


def task_order(tasks: set[str] | list[str]) -> list[str]:
    """The paper's column order (MNLI, SST-2, MRPC, CoLA, QNLI, QQP, RTE, STS-B), others after."""
    position = {t: i for i, t in enumerate(PAPER_TASKS)}
    return sorted(set(tasks), key=lambda t: (position.get(t, len(position)), t))


def task_title(task: str) -> str:
    from lorafit.data.tasks import TASKS

    spec = TASKS.get(task)
    return spec.glue_dir if spec and spec.glue_dir else task


# -- tables -----------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Text for a markdown table cell: no emphasis from '*', no cell break from '|'."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")


def _pct(v: float) -> str:
    return f"{v:.1f}"


def _pm(s: float) -> str:
    text = f"{s:.1f}"
    return "±" + (text[1:] if text.startswith("0.") else text)


@dataclass
class Section:
    title: str
    intro: str
    rows: list[Row]
    with_paper: bool = False
    shared_tasks_only: bool = False  # ablations: only the tasks the compared rows share


def headline_lora(rows: list[Row]) -> tuple[list[Row], bool]:
    """The LoRA rows to set against full fine-tuning, per model: the paper's setting (rank 8 on
    the default W_q, W_v) when it was run, else every rank on the default targets, else all.
    The flag says whether every model had the paper's setting."""
    picked, paper_setting = [], True
    for model in dict.fromkeys(r.model for r in rows if r.method == "lora"):
        lora = [r for r in rows if r.method == "lora" and r.model == model]
        lora = [r for r in lora if r.kind == "LoRA"] or lora  # the variants get their own table
        best = [r for r in lora if r.rank == 8 and r.is_default_targets]
        paper_setting &= bool(best)
        picked += best or [r for r in lora if r.is_default_targets] or lora
    return picked, paper_setting


def detect_sections(rows: list[Row]) -> list[Section]:
    """The main comparison, the rank and target ablations, the LoRA variants, and whatever is left over.

    Main: full fine-tuning and LoRA at the paper's setting (see :func:`headline_lora`). Rank
    ablation: LoRA rows equal but for the rank (2+ ranks). Target ablation: LoRA rows equal but
    for the target modules (2+ sets). Variants: LoRA rows equal but for the variant (rsLoRA, DoRA,
    LoRA+, PiSSA), with full fine-tuning. Every row appears in at least one table.
    """
    sections = []
    shown: set[tuple] = set()
    full = [r for r in rows if r.method == "full"]
    lora, paper_setting = headline_lora(rows)
    if full or (lora and paper_setting):
        intro = "Full fine-tuning and LoRA " + (
            "at the paper's setting (rank 8 on the default W_q, W_v)" if paper_setting else
            "(no run at the paper's setting, rank 8 on the default W_q, W_v: every rank is shown)")
        sections.append(Section("Main comparison: LoRA vs full fine-tuning",
                                intro + ", with the paper's RoBERTa-base rows beside them for reference.",
                                full + lora, with_paper=True))
        shown |= {r.key for r in full + lora}
    lora = [r for r in rows if r.method == "lora"]
    for title, intro, same, differ in (
        ("Rank ablation", "LoRA rows that differ only in the rank r.",
         lambda r: (r.model, r.targets, r.variant, r.kind), lambda r: r.rank),
        ("Target-module ablation", "LoRA rows that differ only in which weight matrices are adapted.",
         lambda r: (r.model, r.rank, r.variant, r.kind), lambda r: r.targets),
    ):
        series: dict[tuple, list[Row]] = {}
        for r in lora:
            series.setdefault(freeze(list(same(r))), []).append(r)
        picked = [r for s in series.values() if len({freeze(differ(r)) for r in s}) > 1 for r in s]
        if picked:
            sections.append(Section(title, intro, picked, shared_tasks_only=True))
            shown |= {r.key for r in picked}
    kinds: dict[tuple, list[Row]] = {}
    for r in lora:
        kinds.setdefault((r.model, r.rank, r.targets), []).append(r)
    variants = [r for s in kinds.values() if len({r.kind for r in s}) > 1 for r in s]
    if variants:
        models = {r.model for r in variants}
        sections.append(Section("LoRA variants", "LoRA and its variants (rsLoRA, DoRA, LoRA+, PiSSA) at the same rank "
                                "and targets, beside full fine-tuning.",
                                [r for r in full if r.model in models] + variants, shared_tasks_only=True))
        shown |= {r.key for r in variants}
    rest = [r for r in rows if r.key not in shown]
    if rest:
        sections.append(Section("Other configurations" if sections else "Results",
                                "Configurations not shown in the tables above." if sections else "", rest,
                                with_paper=not sections))
    return sections


def markdown_table(rows: list[Row], with_paper: bool = False, shared_tasks_only: bool = False) -> str:
    tasks = task_order({t for r in rows for t in r.cells})
    if shared_tasks_only:  # a row from another study may have more tasks: its averages would not compare
        tasks = [t for t in tasks if sum(t in r.cells for r in rows) > 1] or tasks
    metric = {t: next(r.cells[t].metric for r in rows if t in r.cells) for t in tasks}
    ns = [len(g.values) for r in rows for g in r.cells.values()]
    typical = max(set(ns), key=lambda n: (ns.count(n), n))  # cells with another number of seeds say so
    titles = [f"{task_title(t)} ({METRIC_LABELS.get(metric[t], metric[t])})" for t in tasks]
    header = ["Model & method", "# trainable", *titles, "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells, medians = [], []
        for t in tasks:
            g = row.cells.get(t)
            if g is None:
                cells.append("–")
                continue
            text = _pct(g.median) + (_pm(g.spread) if len(g.values) > 1 else "")
            if len(g.values) != typical:
                text += f" (n={len(g.values)})"
            cells.append(text)
            medians.append(g.median)
        avg = _pct(statistics.fmean(medians))
        if len(medians) < len(tasks):
            avg += f" ({len(medians)} task{'s' if len(medians) > 1 else ''})"
        lines.append("| " + " | ".join([_md(row.label), row.trainable(), *cells, avg]) + " |")
    if with_paper and any(t in PAPER_TASKS for t in tasks):
        for p in PAPER_ROWS:
            cells = [(_pct(p.values[t]) + (_pm(p.spread[t]) if p.spread else "")) if t in p.values else "–"
                     for t in tasks]
            shown = [p.values[t] for t in tasks if t in p.values]
            label = f"*{_md(p.label)} (paper: Hu et al. 2022, Table 2)*"
            avg = _pct(statistics.fmean(shown))
            lines.append("| " + " | ".join([label, p.trainable, *cells, avg]) + " |")
    seeds = f"{typical} seed{'s' if typical > 1 else ''}"
    lines += ["", f"Cells without (n=…) are the median of {seeds}." if len(set(ns)) > 1
              else f"Each measured cell is the median of {seeds}."]
    return "\n".join(lines)


def paper_table() -> str:
    header = ["Model & method (paper)", "# trainable"] + [task_title(t) for t in PAPER_TASKS] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for p in PAPER_ROWS:
        cells = [_pct(p.values[t]) + (_pm(p.spread[t]) if p.spread else "") for t in PAPER_TASKS]
        label = f"{_md(p.label)} (paper)"
        lines.append("| " + " | ".join([label, p.trainable, *cells, _pct(p.average)]) + " |")
    return "\n".join(lines)


def runs_table(groups: list[Group], rows: list[Row]) -> str:
    label = {id(g): r.label for r in rows for g in r.cells.values()}
    header = ["Configuration", "Task", "Seeds", "Dev values (%)", "Best epoch (median)", "Train s (median)",
              "Examples/s (median)", "Hardware"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|---:|---:|---:|---|"]

    def med(key: str, fmt: str = "g") -> str:
        values = [r.summary.get(key) for r in g.runs if r.summary.get(key) is not None]
        return format(statistics.median(values), fmt) if values else "–"

    in_row_order = [r.cells[t] for r in rows for t in task_order(r.cells)]
    order = {id(g): i for i, g in enumerate(in_row_order)}
    for g in sorted(groups, key=lambda g: order.get(id(g), len(order))):
        hardware = sorted({hardware_text(r.summary.get("hardware")) for r in g.runs})
        lines.append("| " + " | ".join([
            _md(label.get(id(g), "?")), task_title(g.task), ", ".join(map(str, g.seeds)),
            ", ".join(_pct(v) for v in g.values), med("best_epoch"), med("train_seconds", ".1f"),
            med("examples_per_second", ".1f"), "; ".join(hardware),
        ]) + " |")
    return "\n".join(lines)


def hardware_text(hw: Any) -> str:
    if not isinstance(hw, dict):
        return str(hw or "?")
    chip = hw.get("gpu") or hw.get("cpu") or "?"
    n = hw.get("threads") if hw.get("device") == "cpu" else None
    threads = f", {n} thread{'s' if n != 1 else ''}" if n else ""
    return f"{hw.get('device', '?')}: {chip}{threads}"


def write_markdown(rows: list[Row], groups: list[Group], command: str, plots: list[str]) -> str:
    ns = sorted({len(g.values) for g in groups})
    n_text = f"{ns[0]} seed{'s' if ns[0] > 1 else ''}" if len(ns) == 1 else "seeds (how many: see each table)"
    parts = [
        "# lorafit report",
        "",
        f"Generated from {sum(len(g.runs) for g in groups)} finished runs ({len(groups)} configuration x "
        f"task groups) by `{command}`; run it again to regenerate these tables and plots. "
        "Per-run details and the command that reproduces each run are in `results.csv`.",
        "",
        f"Dev-set results in %, median over {n_text} (best epoch of each run, as in the paper) "
        "± half the range over seeds, (max − min) / 2. Metrics as in the paper: Matthews correlation for "
        "CoLA, Pearson correlation for STS-B, accuracy for the other tasks (MNLI: matched and mismatched "
        "together). # trainable counts the LoRA weights only, without the trained classification head, as "
        "the paper counts them; for full fine-tuning it is every weight. Avg averages the tasks present in "
        f"the row. Rows in *italics* are the paper's ({PAPER_SOURCE}), not measured here; the paper's ± is "
        "its own spread over 5 seeds, and its FT\\* numbers are copied from prior work.",
    ]
    for section in detect_sections(rows):
        parts += ["", f"## {section.title}", ""]
        if section.intro:
            parts += [section.intro, ""]
        parts.append(markdown_table(section.rows, section.with_paper, section.shared_tasks_only))
    parts += [
        "", "## Reference: the paper's RoBERTa-base rows", "",
        f"From {PAPER_SOURCE} (GLUE dev sets, %; \\* = numbers the paper copied from prior work; "
        "LoRA: median over 5 seeds). Avg is the paper's, over its 8 tasks.", "",
        paper_table(),
        "", "## Runs", "",
        runs_table(groups, rows),
    ]
    if plots:
        parts += ["", "## Plots", ""]
        parts.append("\n\n".join(f"![{Path(p).stem}]({p})" for p in plots))
    return "\n".join(parts) + "\n"


# -- results.csv ------------------------------------------------------------------------------


def train_command(config: dict[str, Any]) -> str:
    """The ``lorafit train`` command for a config.yaml: the settings that differ from the defaults."""
    from lorafit.config import TrainConfig

    args = ["lorafit", "train"]
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("resume", "overwrite", "progress", "seeds") or f.name not in config:
            continue
        value, default = config[f.name], f.default
        if value == default or value is None:  # None with a non-None default has no flag
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
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


# -- plots ------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, no pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _errors(groups: list[Group]) -> list[list[float]]:
    return [[g.median - min(g.values) for g in groups], [max(g.values) - g.median for g in groups]]


def _metric_label(metric: str) -> str:
    names = {"accuracy": "accuracy", "matthews_correlation": "Matthews corr.", "pearson": "Pearson r"}
    return names.get(metric, metric)


def plot_rank(task: str, rows: list[Row]) -> bytes | None:
    """Dev metric against rank: one line per (model, target set, setting), full FT as a dashed line."""
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.method == "lora" and task in r.cells:
            series.setdefault((r.model, r.targets, r.variant), []).append(r)
    series = {k: sorted(v, key=lambda r: r.rank) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    models = {k[0] for k in series}
    fulls = [r for r in rows if r.method == "full" and task in r.cells and r.model in models]
    fig = _figure(6.4, 3.8 + 0.2 * (len(series) + len(fulls)))
    ax = fig.add_subplot()
    colors = _colors(len(series) + len(fulls))
    ranks: set[int] = set()
    metric = "metric"
    for k, (color, (key, members)) in enumerate(zip(colors, series.items())):
        groups = [r.cells[task] for r in members]
        ranks |= {r.rank for r in members}
        # Lines side by side, not on top of each other: a small shift on the log axis.
        xs = [r.rank * 2 ** (0.04 * (k - (len(series) - 1) / 2)) for r in members]
        metric = groups[0].metric
        label = "+".join(members[0].target_order or members[0].targets or ["default"])
        if len(models) > 1:
            label = f"{key[0].rsplit('/', 1)[-1]} {label}"
        label += "".join(f", {n}={format_value(v)}" for n, v in key[2] if v is not None)
        ax.errorbar(xs, [g.median for g in groups], yerr=_errors(groups), marker="o", capsize=3, color=color,
                    label=label)
    for color, r in zip(colors[len(series):], fulls):
        ax.axhline(r.cells[task].median, linestyle="--", color=color, label=f"{r.label} (median)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ranks), [str(x) for x in sorted(ranks)])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank r (log2 scale)")
    ax.set_ylabel(f"dev {_metric_label(metric)} (%)")
    ax.set_title(f"{task_title(task)}: dev {_metric_label(metric)} vs rank "
                 "(median, bars: min–max over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center", title="LoRA target modules", title_fontsize=7)
    return _png(fig)


def plot_lora_vs_full(rows: list[Row]) -> bytes | None:
    """Grouped bars per task: full fine-tuning and LoRA (the rows of the main comparison)."""
    full = [r for r in rows if r.method == "full"]
    headline, _ = headline_lora(rows)
    tasks = task_order({t for r in full for t in r.cells} & {t for r in headline for t in r.cells})
    if not tasks:
        return None
    bars = [r for r in full + headline if any(t in r.cells for t in tasks)]
    fig = _figure(max(5.0, 1.2 * len(tasks) + 3.0), 3.6 + 0.22 * len(bars))
    ax = fig.add_subplot()
    width = 0.8 / len(bars)
    for i, (color, r) in enumerate(zip(_colors(len(bars)), bars)):
        present = [t for t in tasks if t in r.cells]
        xs = [tasks.index(t) - 0.4 + width * (i + 0.5) for t in present]
        groups = [r.cells[t] for t in present]
        ax.bar(xs, [g.median for g in groups], width, yerr=_errors(groups), capsize=3, color=color,
               label=f"{r.label}: {r.trainable()} trainable")
    ax.set_xticks(range(len(tasks)),
                  [f"{task_title(t)} ({METRIC_LABELS.get(rows_metric(rows, t), '')})" for t in tasks])
    ax.set_ylabel("dev metric (%)")
    ax.set_title("LoRA vs full fine-tuning (median over seeds, bars: min–max)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(fontsize=7, loc="outside lower center", ncol=1)
    return _png(fig)


def rows_metric(rows: list[Row], task: str) -> str:
    return next((r.cells[task].metric for r in rows if task in r.cells), "")


def plot_curves(task: str, rows: list[Row]) -> bytes | None:
    """Dev metric over training per configuration: median over seeds at each evaluation."""
    lines = []
    for r in rows:
        g = r.cells.get(task)
        if g is None:
            continue
        by_epoch: dict[float, list[float]] = {}
        for run in g.runs:
            for rec in run.metrics:
                if rec.get(g.metric) is not None and rec.get("epoch") is not None:
                    by_epoch.setdefault(float(rec["epoch"]), []).append(100 * float(rec[g.metric]))
        if by_epoch:
            lines.append((r, g, sorted(by_epoch.items())))
    if not lines:
        return None
    fig = _figure(6.4, 3.8 + 0.2 * len(lines))
    ax = fig.add_subplot()
    bands = len(lines) <= 4  # more overlapping bands would hide the lines
    for color, (r, g, points) in zip(_colors(len(lines)), lines):
        xs = [e for e, _ in points]
        meds = [statistics.median(v) for _, v in points]
        ax.plot(xs, meds, marker="o", markersize=3, color=color, label=f"{r.label} (n={len(g.runs)})")
        if bands and len(g.runs) > 1:
            ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points], color=color,
                            alpha=0.12)
    metric = lines[0][1].metric
    ax.set_xlabel("epoch")
    if all(e.is_integer() for _, _, points in lines for e, _ in points):  # per-epoch evaluation: no 1.25 ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"dev {_metric_label(metric)} (%)")
    band = ", band: min–max" if bands and any(len(g.runs) > 1 for _, g, _ in lines) else ""
    ax.set_title(f"{task_title(task)}: dev {_metric_label(metric)} during training (median over seeds{band})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")
    return _png(fig)


# -- the report -------------------------------------------------------------------------------


def _file_part(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in task)


@dataclass
class Report:
    """What :func:`make_report` wrote, and from how many runs."""

    files: dict[str, Path]
    runs: int
    groups: int


def make_report(paths: list[str | Path], output: str | Path | None = None,
                command: str | None = None) -> Report:
    """Write results.csv, results.md and the plots into ``output``."""
    from lorafit.io import atomic_write_bytes

    runs = find_runs(paths)
    groups = group_runs(runs)
    rows = build_rows(groups)
    out = Path(output) if output else Path(paths[0]) / "report"
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--output {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in PLOT_PATTERNS:  # plots of an earlier report whose data is gone
        for old in out.glob(pattern):
            old.unlink()
    if command is None:
        flags = ["--output", str(output)] if output else []
        command = shlex.join(["lorafit", "report", *map(str, paths), *flags])

    images: dict[str, bytes] = {}
    tasks = task_order({g.task for g in groups})
    for task in tasks:
        if (png := plot_rank(task, rows)) is not None:
            images[f"rank_{_file_part(task)}.png"] = png
    if (png := plot_lora_vs_full(rows)) is not None:
        images["lora_vs_full.png"] = png
    for task in tasks:
        if (png := plot_curves(task, rows)) is not None:
            images[f"curves_{_file_part(task)}.png"] = png

    written = {}
    for name, data in [("results.csv", write_csv(runs).encode()),
                       ("results.md", write_markdown(rows, groups, command, list(images)).encode()),
                       *images.items()]:
        atomic_write_bytes(out / name, data)
        written[name] = out / name
    return Report(written, len(runs), len(groups))


BEGIN_MARK = "<!-- lorafit report: begin (generated; edits between these marks are overwritten) -->"
END_MARK = "<!-- lorafit report: end -->"


def splice_into(document: str | Path, results_md: Path) -> None:
    """Put the generated tables and figures into a hand-written document, between its marks.

    The prose around the marks stays as written; everything between them is regenerated, so a
    published report never holds a hand-typed number. Image links are made relative to the
    document.
    """
    from lorafit.io import atomic_write_bytes

    document = Path(document)
    try:
        text = document.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorafitError(f"--into {document}: file not found") from None
    if text.count(BEGIN_MARK) != 1 or text.count(END_MARK) != 1 or text.index(BEGIN_MARK) > text.index(END_MARK):
        raise LorafitError(f"--into {document}: expected one line {BEGIN_MARK!r} followed by one line {END_MARK!r}")
    body = results_md.read_text(encoding="utf-8").split("\n", 1)[1].strip()  # without its "# lorafit report" title
    prefix = Path(os.path.relpath(results_md.parent, document.parent)).as_posix()
    body = re.sub(r"\]\(([^)/]+\.(?:png|csv))\)", lambda m: f"]({prefix}/{m.group(1)})", body)
    body = body.replace("`results.csv`", f"[`results.csv`]({prefix}/results.csv)")
    # Generated sections become subsections of the document's own.
    body = re.sub(r"^## ", "### ", body, flags=re.MULTILINE)
    head, rest = text.split(BEGIN_MARK, 1)
    tail = rest.split(END_MARK, 1)[1]
    atomic_write_bytes(document, f"{head}{BEGIN_MARK}\n\n{body}\n\n{END_MARK}{tail}".encode())


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tables (results.csv, results.md) and plots (PNG) from finished runs found under the given run or "
        "sweep directories. Runs that differ only by seed are summarised by their median."
    )
    parser.add_argument("paths", nargs="+", metavar="DIR",
                        help="run or sweep directories (searched recursively for finished runs)")
    parser.add_argument("--output", metavar="DIR",
                        help="where to write the report (default: <first DIR>/report)")
    parser.add_argument("--into", metavar="FILE",
                        help="also put the tables and figures into this markdown file, between its "
                             "'lorafit report: begin/end' marks")


def run_report_cli(args: argparse.Namespace) -> int:
    report = make_report(args.paths, args.output)
    folder = next(iter(report.files.values())).parent
    if args.into:
        splice_into(args.into, report.files["results.md"])
    print(f"report of {report.runs} runs ({report.groups} configuration x task groups) written to {folder}: "
          f"{', '.join(report.files)}")
    return 0
