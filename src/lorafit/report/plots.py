"""The report's PNG plots (matplotlib's Agg backend, no pyplot state), byte-stable across reruns."""

from __future__ import annotations

import io
import statistics

from lorafit.report.rows import Row, headline_lora, task_order, task_title
from lorafit.report.runs import Group
from lorafit.report.tables import METRIC_LABELS, summary_median
from lorafit.settings import format_value


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
            series.setdefault((r.model, r.targets, r.variant, r.kind), []).append(r)
    # A line needs two ranks: variants (DoRA, PiSSA, ...) at one rank are not a rank series.
    series = {k: sorted(v, key=lambda r: r.rank) for k, v in series.items() if len({r.rank for r in v}) > 1}
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


def plot_variants(rows: list[Row]) -> bytes | None:
    """The variants study in one figure: each row's dev metric per task (left), and each LoRA
    variant's mean gap to full fine-tuning against its training speed relative to plain LoRA
    (right), so that what a variant gains and what it costs show side by side."""
    tasks = task_order(set.intersection(*(set(r.cells) for r in rows))) if rows else []
    full = next((r for r in rows if r.method == "full"), None)
    plain = next((r for r in rows if r.method == "lora" and r.kind == "LoRA"), None)
    if not tasks or full is None or plain is None:
        return None
    fig = _figure(11.0, 4.4 + 0.2 * len(rows))
    bars_ax, cost_ax = fig.subplots(1, 2, width_ratios=[1.5, 1.0])
    lora = [r for r in rows if r.method == "lora"]
    colors = dict(zip((r.key for r in rows), _colors(len(rows))))
    width = 0.8 / len(lora)
    ref = [full.cells[t].median for t in tasks]
    for i, r in enumerate(lora):
        # The gap to full fine-tuning, not the metric itself: the variants differ by a point or
        # two, which bars from zero would hide.
        groups = [r.cells[t] for t in tasks]
        xs = [k - 0.4 + width * (i + 0.5) for k in range(len(tasks))]
        bars_ax.bar(xs, [g.median - f for g, f in zip(groups, ref)], width, yerr=_errors(groups), capsize=2,
                    color=colors[r.key], label=r.label)
    bars_ax.axhline(0.0, color="black", linewidth=0.8)
    bars_ax.set_xticks(range(len(tasks)), [f"{task_title(t)} ({METRIC_LABELS.get(rows_metric(rows, t), '')}; "
                                           f"FT {full.cells[t].median:.1f})" for t in tasks])
    bars_ax.set_ylabel("dev metric − full fine-tuning's (points)")
    bars_ax.set_title("each variant against full fine-tuning (medians over seeds, bars: min–max)", fontsize=9)
    bars_ax.grid(axis="y", alpha=0.3)
    bars_ax.set_axisbelow(True)

    def speed(r: Row, t: str) -> float | None:
        return summary_median(r.cells[t], "examples_per_second")

    for r in rows:
        ratios = [a / b for t in tasks if (a := speed(r, t)) and (b := speed(plain, t))]
        if not ratios:
            continue
        x, gap = statistics.fmean(ratios), statistics.fmean(r.cells[t].median - f for t, f in zip(tasks, ref))
        cost_ax.scatter([x], [gap], s=60, color=colors[r.key], edgecolors="black", zorder=3)
        cost_ax.annotate(r.kind if r.method == "lora" else "FT", (x, gap), fontsize=7, xytext=(5, 4),
                         textcoords="offset points")
    cost_ax.axhline(0.0, linestyle="--", color="grey", linewidth=0.8)
    cost_ax.set_xlabel("training examples/s relative to plain LoRA (mean over tasks)")
    cost_ax.set_ylabel("mean gap to full fine-tuning (points)")
    cost_ax.set_title("gain vs cost (up: closer to or above FT; right: faster)", fontsize=9)
    cost_ax.grid(alpha=0.3)
    bars_ax.legend(fontsize=7, loc="best")
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


def plot_examples_seen(task: str, series: list[tuple[str, Group]]) -> bytes | None:
    """Dev metric against training examples seen, one colour per (label, group): the median over
    seeds at each evaluation, each seed as a faint line. Puts the cost of training longer (or of
    a method that needs more steps) on one axis for LoRA and full fine-tuning alike."""
    lines = []
    for label, g in series:
        curves = [c for run in g.runs if (c := run.examples_seen_curve())]
        if curves:
            lines.append((label, g, curves))
    if not lines:
        return None
    from matplotlib.ticker import FuncFormatter

    fig = _figure(6.4, 3.8 + 0.2 * len(lines))
    ax = fig.add_subplot()
    for color, (label, g, curves) in zip(_colors(len(lines)), lines):
        by_x: dict[int, list[float]] = {}
        for curve in curves:
            for x, y in curve:
                by_x.setdefault(x, []).append(y)
            if len(curves) > 1:
                ax.plot([x for x, _ in curve], [y for _, y in curve], color=color, alpha=0.25, linewidth=0.8)
        points = sorted(by_x.items())
        ax.plot([x for x, _ in points], [statistics.median(v) for _, v in points], marker="o", markersize=2.5,
                color=color, label=f"{label} (n={len(curves)})")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    metric = lines[0][1].metric
    ax.set_xlabel("training examples seen (optimizer steps x global batch size)")
    ax.set_ylabel(f"dev {_metric_label(metric)} (%)")
    faint = ", faint: each seed" if any(len(c) > 1 for _, _, c in lines) else ""
    ax.set_title(f"{task_title(task)}: dev {_metric_label(metric)} vs training examples seen "
                 f"(median over seeds{faint})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")
    return _png(fig)
