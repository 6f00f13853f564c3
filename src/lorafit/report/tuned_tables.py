"""The markdown of a tuned report (``lorafit report --tune FIELD``): the main table at each task's
chosen value, the values chosen and their seed counts, the verdict on LoRA vs full fine-tuning,
and the search tables the choices come from."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from lorafit.report.rows import Row, build_rows, detect_sections, headline_lora, task_order, task_title
from lorafit.report.runs import Group
from lorafit.report.tables import (
    METRIC_LABELS,
    _md,
    _pct,
    closing_parts,
    intro_parts,
    markdown_table,
    render_sections,
)
from lorafit.report.tuning import Choice, tune_groups, value_order
from lorafit.settings import format_value

# Seeds per cell that the tuning protocol asks for (search on one seed, then 3 at the chosen value).
PROTOCOL_SEEDS = 3
# How close LoRA's average must come to full fine-tuning's for the paper's claim 1 (Table 2) to hold here.
CLAIM_POINTS = 1.0
EDGE_NOTE = "† best at the edge of the searched range: a value beyond it might do better."


@dataclass
class Tuned:
    """A tuned report's data: the choice per configuration and task, and the rows they make."""

    field: str
    choices: list[Choice]
    rows: list[Row]  # one per configuration without the tuned field; cells at the chosen values

    def choice(self, group: Group) -> Choice:
        return next(c for c in self.choices if c.group is group)

    @property
    def cells(self) -> list[Group]:
        return [g for r in self.rows for g in r.cells.values()]


def tune(groups: list[Group], field: str) -> Tuned:
    choices = tune_groups(groups, field)
    return Tuned(field, choices, build_rows([c.group for c in choices]))


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _cell_value(choice: Choice, value: object) -> str:
    run = choice.search_run(value)
    if run is None:
        return "–"
    text = _pct(run.value)
    if value == choice.chosen:
        text = f"**{text}**" + ("†" if choice.at_edge else "")
    best, epochs = run.summary.get("best_epoch"), run.config.get("epochs")
    if best is not None:
        text += f" (ep. {float(best):g}" + (f"/{float(epochs):g})" if epochs else ")")
    return text


def search_tables(tuned: Tuned) -> list[str]:
    """Per configuration searched at 2+ values: one row per value, the search seed's dev value per task."""
    parts: list[str] = []
    for row in tuned.rows:
        choices = {t: tuned.choice(g) for t, g in row.cells.items()}
        if all(len(c.values) < 2 for c in choices.values()):
            continue  # run at one value only (e.g. a study at an already chosen rate): nothing was searched
        tasks = task_order(choices)
        # Every value run, also one the search seed missed (shown as "–": it took no part in the choice).
        values = sorted({v for c in choices.values() for v in c.candidates}, key=value_order)
        metrics = {t: choices[t].group.metric for t in tasks}
        titles = [f"{task_title(t)} ({METRIC_LABELS.get(metrics[t], metrics[t])})" for t in tasks]
        lines = [f"| {tuned.field} | " + " | ".join(titles) + " |", "|---:|" + "---:|" * len(tasks)]
        for v in values:
            lines.append(f"| {format_value(v)} | " + " | ".join(_cell_value(choices[t], v) for t in tasks) + " |")
        seeds = {t: choices[t].search_seed for t in tasks}
        listed = list(seeds.values())
        common = min(set(listed), key=lambda s: (-listed.count(s), value_order(s)))  # the usual one, named once
        other = [f"{task_title(t)}: seed {s}" for t, s in seeds.items() if s != common]
        parts += ["", f"**{_md(row.label)}**", "", "\n".join(lines), "",
                  f"Dev value (%) of seed {common}" + (f" ({', '.join(other)})" if other else "")
                  + " at each value, with its best epoch / epochs trained. **Bold**: the value chosen for the "
                  "task (best dev value; on a tie, the lowest value)."
                  + (" " + EDGE_NOTE if any(c.at_edge for c in choices.values()) else "")]
    return parts


def choice_table(tuned: Tuned) -> str:
    """The chosen value per configuration and task, and how many seeds stand behind its median."""
    tasks = task_order({t for r in tuned.rows for t in r.cells})
    lines = ["| Configuration | " + " | ".join(task_title(t) for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for row in tuned.rows:
        cells = []
        for t in tasks:
            g = row.cells.get(t)
            c = tuned.choice(g) if g is not None else None
            cells.append("–" if c is None else
                         f"{format_value(c.chosen)}{'†' if c.at_edge else ''} ({_seeds(len(g.values))})")
        lines.append(f"| {_md(row.label)} | " + " | ".join(cells) + " |")
    edge = any(c.at_edge for c in tuned.choices)
    return "\n".join(lines) + ("\n\n" + EDGE_NOTE if edge else "")


def _signed(points: float) -> str:
    return f"{round(points, 1) + 0.0:+.1f}"  # + 0.0 turns a rounded -0.0 into 0.0


def _claim_status(gap: float) -> str:
    # Judged on the gap as printed (to 0.1), so that the sentence agrees with its own number.
    gap, bar = round(gap, 1), f"{CLAIM_POINTS:.1f} point"
    if abs(gap) <= CLAIM_POINTS:
        return f"within {bar} of full fine-tuning: the claim holds on these runs"
    if gap < 0:
        return f"more than {bar} behind full fine-tuning: the claim does not hold on these runs"
    return f"more than {bar} ahead of full fine-tuning: the claim holds on these runs"


def verdicts(rows: list[Row]) -> list[str]:
    """Claim 1 (LoRA within :data:`CLAIM_POINTS` of full fine-tuning on average), one paragraph per
    LoRA configuration at the paper's setting; none unless there is exactly one full fine-tuning row.

    Only the configurations compared on the most tasks get a verdict: one run on fewer tasks (a
    study at an already chosen rate, such as the head study) tests something else, and its
    average over one or two tasks would read as a verdict on the claim. Those get one line each.
    """
    full = [r for r in rows if r.method == "full"]
    if len(full) != 1:
        return []
    (ft,) = full
    compared = [(lora, task_order(set(lora.cells) & set(ft.cells))) for lora in headline_lora(rows)[0]]
    compared = [(lora, shared) for lora, shared in compared if shared]
    if not compared:
        return []
    most = max(len(shared) for _, shared in compared)
    out, studies = [], []
    for lora, shared in compared:
        per_task = ", ".join(f"{task_title(t)} {_signed(lora.cells[t].median - ft.cells[t].median)}" for t in shared)
        if len(shared) < most:
            studies.append(f"- {_md(lora.label)}: {per_task} (LoRA − FT)")
            continue
        names = ", ".join(task_title(t) for t in shared)
        a = statistics.fmean(lora.cells[t].median for t in shared)
        b = statistics.fmean(ft.cells[t].median for t in shared)
        text = (f"**{_md(lora.label)}** averages {_pct(a)} against {_pct(b)} for **{_md(ft.label)}** over the "
                f"{len(shared)} task{'s' if len(shared) > 1 else ''} both have ({names}): a gap of "
                f"{_signed(a - b)} points, {_claim_status(a - b)}. Per task (LoRA − FT): {per_task}.")
        missing = task_order((set(lora.cells) | set(ft.cells)) - set(shared))
        if missing:
            text += f" Not compared (run by one method only): {', '.join(task_title(t) for t in missing)}."
        fewest = min(len(row.cells[t].values) for row in (lora, ft) for t in shared)
        text += f" On {_seeds(fewest)} per task at the fewest"
        text += (f"; {PROTOCOL_SEEDS} required by the protocol, so this verdict is provisional."
                 if fewest < PROTOCOL_SEEDS else f" ({PROTOCOL_SEEDS} required by the protocol).")
        out.append(text)
    if studies:
        out.append("No verdict for the configurations run on fewer tasks (studies at an already chosen rate); "
                   "their differences from full fine-tuning, per task:\n\n" + "\n".join(studies))
    return out


def tuned_parts(tuned: Tuned) -> list[str]:
    """The sections of a tuned report, in place of the untuned main comparison and ablations."""
    f = tuned.field
    # The main table holds full fine-tuning and LoRA at the paper's setting; rank and target
    # ablations and variants get their own tables below it, as in an untuned report.
    sections = detect_sections(tuned.rows)
    main = next((s for s in sections if s.main), None)
    parts = ["", f"## Main table: {f} tuned per task", "",
             (f"Each configuration at the {f} chosen for each task by the search below (the search seed's best "
              f"dev value), median over every seed run at that {f}, with the paper's RoBERTa-base rows beside "
              "them for reference."), "",
             markdown_table(main.rows if main else tuned.rows, with_paper=True), "",
             f"The {f} chosen per task, and the seeds behind each median:", "",
             choice_table(tuned)]
    sentences = verdicts(tuned.rows)
    if sentences:
        parts += ["", "## Verdict: does LoRA match full fine-tuning?", "",
                  (f"The paper's claim 1 (Table 2), as tested here: LoRA averages within {CLAIM_POINTS:.1f} point "
                   f"of full fine-tuning over the tasks, both with {f} tuned per task, on the median of "
                   f"{PROTOCOL_SEEDS} seeds. Computed from the main table above."), ""]
        parts.append("\n\n".join(sentences))
    if main:
        parts += render_sections([s for s in sections if not s.main])
    search = search_tables(tuned)
    if search:
        parts += ["", f"## {f} search", "",
                  f"How each {f} above was chosen: every configuration that was run at more than one {f}."]
        parts += search
    return parts


def write_tuned_markdown(tuned: Tuned, rows: list[Row], groups: list[Group], command: str,
                         plots: list[str]) -> str:
    """results.md of a tuned report; ``rows`` are the untuned ones, which label the runs table."""
    parts = intro_parts(groups, command, tuned.cells) + tuned_parts(tuned) + closing_parts(groups, rows, plots)
    return "\n".join(parts) + "\n"
