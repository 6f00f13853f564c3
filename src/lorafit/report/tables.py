"""The markdown of ``results.md``: paper-style tables, the paper's rows, and the runs table."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lorafit.report.paper import PAPER_ROWS, PAPER_SOURCE, PAPER_TASKS
from lorafit.report.rows import Row, Section, detect_sections, task_order, task_title
from lorafit.report.runs import Group

METRIC_LABELS = {"accuracy": "Acc", "matthews_correlation": "MCC", "pearson": "Pearson", "f1": "F1",
                 "spearmanr": "Spearman"}


def _md(text: str) -> str:
    """Text for a markdown table cell: no emphasis from '*', no cell break from '|'."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")


def _pct(v: float) -> str:
    return f"{v:.1f}"


def _pm(s: float) -> str:
    text = f"{s:.1f}"
    return "±" + (text[1:] if text.startswith("0.") else text)


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


def summary_median(group: Group, key: str) -> float | None:
    """The median of a summary field (e.g. examples_per_second) over a group's runs that have it."""
    values = [r.summary[key] for r in group.runs if r.summary.get(key) is not None]
    return statistics.median(values) if values else None


def runs_table(groups: list[Group], rows: list[Row]) -> str:
    label = {id(g): r.label for r in rows for g in r.cells.values()}
    header = ["Configuration", "Task", "Seeds", "Dev values (%)", "Best epoch (median)", "Train s (median)",
              "Examples/s (median)", "Hardware"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|---:|---:|---:|---|"]

    def med(key: str, fmt: str = "g") -> str:
        value = summary_median(g, key)
        return format(value, fmt) if value is not None else "–"

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


def intro_parts(groups: list[Group], command: str, cells: list[Group]) -> list[str]:
    """The title and the paragraphs that say where the numbers come from; ``cells`` are the groups
    the tables' medians are over."""
    ns = sorted({len(g.values) for g in cells})
    n_text = f"{ns[0]} seed{'s' if ns[0] > 1 else ''}" if len(ns) == 1 else "seeds (how many: see each table)"
    return [
        "# lorafit report",
        "",
        (f"Generated from {sum(len(g.runs) for g in groups)} finished runs ({len(groups)} configuration x "
         f"task groups) by `{command}`; run it again to regenerate these tables and plots. "
         "Per-run details and the command that reproduces each run are in `results.csv`."),
        "",
        (f"Dev-set results in %, median over {n_text} (best epoch of each run, as in the paper) "
        "± half the range over seeds, (max − min) / 2. Metrics as in the paper: Matthews correlation for "
        "CoLA, Pearson correlation for STS-B, accuracy for the other tasks (MNLI: matched and mismatched "
        "together). # trainable counts the LoRA weights only, without the trained classification head, as "
        "the paper counts them; for full fine-tuning it is every weight. Avg averages the tasks present in "
        f"the row. Rows in *italics* are the paper's ({PAPER_SOURCE}), not measured here; the paper's ± is "
        "its own spread over 5 seeds, and its FT\\* numbers are copied from prior work."),
    ]


def section_parts(rows: list[Row]) -> list[str]:
    """The main comparison and the ablations (see :func:`detect_sections`), one table each."""
    return render_sections(detect_sections(rows))


def render_sections(sections: list[Section]) -> list[str]:
    """Each section as a heading, its intro and its table."""
    parts: list[str] = []
    for section in sections:
        parts += ["", f"## {section.title}", ""]
        if section.intro:
            parts += [section.intro, ""]
        parts.append(markdown_table(section.rows, section.with_paper, section.shared_tasks_only))
        if section.with_speed:
            parts += ["", speed_table(section.rows)]
            if verdict := variants_verdict(section.rows):
                parts += ["", verdict]
    return parts


def _signed(v: float) -> str:
    return f"{v:+.1f}".replace("-", "−")


def variants_verdict(rows: list[Row]) -> str | None:
    """Which LoRA variant comes closest to full fine-tuning: each one's mean gap to it over the
    tasks every row ran, closest first, and each one's difference from plain LoRA per task, set
    against the seeds' spread (half ranges of the two cells added up): a difference inside it is
    not told apart from noise."""
    full = next((r for r in rows if r.method == "full"), None)
    lora = [r for r in rows if r.method == "lora"]
    plain = next((r for r in lora if r.kind == "LoRA"), None)
    tasks = [t for t in task_order({t for r in rows for t in r.cells}) if all(t in r.cells for r in rows)]
    if full is None or len(lora) < 2 or not tasks:
        return None

    def gap(row: Row) -> float:
        return statistics.fmean(row.cells[t].median - full.cells[t].median for t in tasks)

    seeds = min(len(r.cells[t].values) for r in rows for t in tasks)
    lines = [(f"**Which variant comes closest to full fine-tuning** (mean over {', '.join(map(task_title, tasks))}, "
             f"the tasks every row ran, of variant − FT in points; closest first):"), ""]
    for row in sorted(lora, key=gap, reverse=True):
        per_task = ", ".join(f"{task_title(t)} {_signed(row.cells[t].median - full.cells[t].median)}" for t in tasks)
        line = f"- {_md(row.kind)}: {_signed(gap(row))} ({per_task})"
        if plain is not None and row is not plain:
            beyond = [t for t in tasks if abs(row.cells[t].median - plain.cells[t].median)
                      > row.cells[t].spread + plain.cells[t].spread]
            line += f"; against plain LoRA {_signed(gap(row) - gap(plain))}"
            if seeds > 1:
                line += (f", beyond the seeds' spread on {len(beyond)} of {len(tasks)} task"
                         f"{'s' if len(tasks) > 1 else ''}" + (f" ({', '.join(map(task_title, beyond))})" if beyond else ""))
        lines.append(line)
    if seeds < 2:
        lines += ["", "One seed per cell at the fewest: no spread to tell a difference from noise yet."]
    return "\n".join(lines)


def speed_table(rows: list[Row]) -> str:
    """Training examples/s of each row per task (median over its runs), and its mean ratio to plain
    LoRA's over the tasks both ran: what a variant's gain costs in time."""
    tasks = task_order({t for r in rows for t in r.cells})

    def speed(row: Row, task: str) -> float | None:
        return summary_median(row.cells[task], "examples_per_second") if task in row.cells else None

    plain = next((r for r in rows if r.method == "lora" and r.kind == "LoRA"), None)
    header = ["Model & method", *(f"{task_title(t)} (examples/s)" for t in tasks)] + (["x LoRA"] if plain else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [format(v, ".1f") if (v := speed(row, t)) is not None else "–" for t in tasks]
        if plain:
            ratios = [a / b for t in tasks if (a := speed(row, t)) and (b := speed(plain, t))]
            cells.append(f"{statistics.fmean(ratios):.2f}x" if ratios else "–")
        lines.append("| " + " | ".join([_md(row.label), *cells]) + " |")
    chips = sorted({hardware_text(r.summary.get("hardware")) for row in rows for g in row.cells.values()
                    for r in g.runs})
    lines += ["", "Training speed: examples/s over the training loop (evaluation excluded), median over "
              "the runs of each cell; x LoRA is the mean over tasks of the ratio to plain LoRA's. "
              + ("Ran on " + chips[0] + "." if len(chips) == 1 else
                 "The runs ran on different CPUs (" + "; ".join(chips) + "): compare within one CPU only.")]
    return "\n".join(lines)


def closing_parts(groups: list[Group], rows: list[Row], plots: list[str]) -> list[str]:
    """The paper's own table, every configuration's runs, and the plots."""
    parts = [
        "", "## Reference: the paper's RoBERTa-base rows", "",
        (f"From {PAPER_SOURCE} (GLUE dev sets, %; \\* = numbers the paper copied from prior work; "
         "LoRA: median over 5 seeds). Avg is the paper's, over its 8 tasks."), "",
        paper_table(),
        "", "## Runs", "",
        runs_table(groups, rows),
    ]
    if plots:
        parts += ["", "## Plots", ""]
        parts.append("\n\n".join(f"![{Path(p).stem}]({p})" for p in plots))
    return parts


def write_markdown(rows: list[Row], groups: list[Group], command: str, plots: list[str]) -> str:
    parts = intro_parts(groups, command, groups) + section_parts(rows) + closing_parts(groups, rows, plots)
    return "\n".join(parts) + "\n"
