"""The figure of ``docs/performance.md``: training examples/s by implementation and setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.bench.env import cpu_name


def plot_throughput(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of median training examples/s (min-max as error bars), one panel per task.

    Args:
        records: Bench records (measurements and peaks; summaries are recomputed).
        path: PNG file to write.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot state
    from matplotlib.figure import Figure

    from lorafit.bench.summary import side_label, summarize, workload_details, workload_key
    from lorafit.errors import LorafitError
    from lorafit.io import atomic_write_bytes

    rows = [r for r in summarize([r for r in records if r.get("kind") in ("measurement", "peak")])
            if r["kind"] == "summary" and r["mode"] == "train"]
    if not rows:
        raise LorafitError("--plot: the records hold no training measurements (run `lorafit bench train`)")
    panels = sorted({workload_key(r["settings"]) for r in rows})
    details = workload_details([r["settings"] for r in rows])
    fig = Figure(figsize=(6.0 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels, strict=True):
        mine = [r for r in rows if workload_key(r["settings"]) == key]
        mine.sort(key=lambda r: (r["impl"] != "peft", r["examples_per_second"]["median"]))
        medians = [r["examples_per_second"]["median"] for r in mine]
        errors = [[m - r["examples_per_second"]["min"] for m, r in zip(medians, mine, strict=True)],
                  [r["examples_per_second"]["max"] - m for m, r in zip(medians, mine, strict=True)]]
        colors = ["#999999" if r["impl"] == "peft" else "#1f77b4" for r in mine]
        ax.barh([side_label(r) for r in mine], medians, xerr=errors, color=colors, capsize=3)
        for y, (m, high) in enumerate(zip(medians, errors[1], strict=True)):
            # Beside the error bar, not under it.
            ax.text(m + high, y, f"  {m:.0f}" if m >= 10 else f"  {m:.2g}", va="center", fontsize=8)
        ax.set_xlim(0, 1.15 * max(m + high for m, high in zip(medians, errors[1], strict=True)))
        ax.set_xlabel("training examples/s (median, min-max)")
        env = mine[0]["environment"]
        # The CPU is part of every figure: the same code runs 3x faster on one of these machines.
        task, model, device, _ = key
        title = f"{task}, {model.split('/')[-1]}, {device}, {env['threads']} threads"
        title += f"\n({details[key]})" if details[key] else ""
        ax.set_title(f"{title}\n{cpu_name(env)}", fontsize=8)
    path = Path(path)
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path
