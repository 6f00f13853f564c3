"""Result rows: groups of one configuration across tasks, their labels and order, and the
sections (main comparison, ablations) they fall into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.report.paper import PAPER_TASKS
from lorafit.report.runs import Group
from lorafit.settings import VARIANT_FIELDS, distinguishing_fields, format_value, freeze


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
    """A row's name for the LoRA variant its :data:`VARIANT_FIELDS` make: LoRA, rsLoRA, DoRA, PiSSA,
    LoRA+ x16, or their combination (rsDoRA, ...)."""
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


def format_count(n: float) -> str:
    """Parameter counts like the paper (125.0M, 0.3M), with K below 0.1M so small ones stay visible."""
    if n >= 1e5:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


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


@dataclass
class Section:
    title: str
    intro: str
    rows: list[Row]
    with_paper: bool = False
    shared_tasks_only: bool = False  # ablations: only the tasks the compared rows share
    main: bool = False  # the main comparison (full fine-tuning and LoRA at the paper's setting)
    with_speed: bool = False  # the variants: their training speed beside their metric, so a gain's cost shows


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
                                full + lora, with_paper=True, main=True))
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
                                [r for r in full if r.model in models] + variants, shared_tasks_only=True,
                                with_speed=True))
        shown |= {r.key for r in variants}
    rest = [r for r in rows if r.key not in shown]
    if rest:
        sections.append(Section("Other configurations" if sections else "Results",
                                "Configurations not shown in the tables above." if sections else "", rest,
                                with_paper=not sections))
    return sections
