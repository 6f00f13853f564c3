"""Summary statistics of a split, for ``lorafit data stats TASK``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lorafit.data.parsing import Split
from lorafit.data.tasks import TaskSpec
from lorafit.data.tokenization import Encoded

__all__ = ["PERCENTILES", "format_stats", "split_stats"]

PERCENTILES = (50, 90, 95, 99)


def split_stats(split: Split, encoded: Encoded | None = None) -> dict[str, Any]:
    """Size, label balance and (given ``encoded``) token-length statistics of one split.

    Returns:
        A JSON-serializable dict::

            {"split", "source", "checksum", "num_examples",
             "labels": {"counts": {name: int}, "fractions": {name: float}}    # classification
                    or {"mean", "std", "min", "max"},                           # regression
             "token_lengths": {"mean", "p50", "p90", "p95", "p99", "max",
                               "max_length", "at_max_length"}}                  # only with encoded

        Percentiles are lengths ``L`` such that that share of examples has at most ``L``
        tokens. ``at_max_length`` counts examples exactly ``max_length`` long: those were
        (most likely) truncated.
    """
    stats: dict[str, Any] = {
        "split": split.split,
        "source": split.source,
        "checksum": split.checksum,
        "num_examples": len(split),
    }
    task = split.task
    if task.label_names is None:
        scores = split.labels.astype(np.float64)
        stats["labels"] = {
            "mean": float(scores.mean()),
            "std": float(scores.std()),
            "min": float(scores.min()),
            "max": float(scores.max()),
        }
    else:
        counts = np.bincount(split.labels, minlength=task.num_labels)
        total = max(int(counts.sum()), 1)
        stats["labels"] = {
            "counts": {name: int(c) for name, c in zip(task.label_names, counts, strict=True)},
            "fractions": {name: float(c) / total for name, c in zip(task.label_names, counts, strict=True)},
        }
    if encoded is not None:
        if len(encoded) != len(split):
            raise ValueError(f"encoded has {len(encoded)} examples, split has {len(split)}")
        lengths = encoded.lengths
        token_stats: dict[str, Any] = {"mean": float(lengths.mean())}
        for q in PERCENTILES:
            # "inverted_cdf" gives an actual length, the smallest one covering q% of examples,
            # which reads directly as a max_length choice.
            token_stats[f"p{q}"] = int(np.percentile(lengths, q, method="inverted_cdf"))
        token_stats["max"] = int(lengths.max())
        token_stats["max_length"] = encoded.max_length
        token_stats["at_max_length"] = int((lengths >= encoded.max_length).sum())
        stats["token_lengths"] = token_stats
    return stats


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """Lay out a table; ``align`` has one letter per column, ``l`` (text) or ``r`` (numbers).

    By default the first column (the split name) is text and the others are numbers.
    """
    if align is None:
        align = "l" + "r" * (len(header) - 1)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [
            cell.ljust(width) if a == "l" else cell.rjust(width)
            for cell, width, a in zip(row, widths, align, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_stats(task: TaskSpec, stats_by_split: dict[str, dict[str, Any]]) -> str:
    """Render :func:`split_stats` results for several splits as plain-text tables."""
    kind = "regression" if task.is_regression else f"classification, {task.num_labels} labels"
    inputs = "sentence pairs" if len(task.text_fields) == 2 else "single sentences"
    where = f" (GLUE {task.glue_dir})" if task.glue_dir else ""
    lines = [f"{task.name}{where}: {inputs}, {kind}; best-epoch metric: {task.metric}", ""]

    splits = list(stats_by_split.items())
    lines += _table(
        ["split", "examples", "source"],
        [[name, f"{s['num_examples']:,}", s["source"]] for name, s in splits],
        "lrl",
    )
    lines.append("")

    if task.label_names is None:
        lines += _table(
            ["score", "mean", "std", "min", "max"],
            [[name, *(f"{s['labels'][k]:.3f}" for k in ("mean", "std", "min", "max"))] for name, s in splits],
        )
    else:
        lines += _table(
            ["labels", *task.label_names],
            [
                [
                    name,
                    *(
                        f"{s['labels']['counts'][label]:,} ({100 * s['labels']['fractions'][label]:.1f}%)"
                        for label in task.label_names
                    ),
                ]
                for name, s in splits
            ],
        )

    with_tokens = [(name, s["token_lengths"]) for name, s in splits if "token_lengths" in s]
    if with_tokens:
        lines.append("")
        percentile_keys = [f"p{q}" for q in PERCENTILES]
        lines += _table(
            ["tokens", "mean", *percentile_keys, "max", "max_length", "at max_length"],
            [
                [
                    name,
                    f"{t['mean']:.1f}",
                    *(str(t[k]) for k in percentile_keys),
                    str(t["max"]),
                    str(t["max_length"]),
                    f"{t['at_max_length']:,}",
                ]
                for name, t in with_tokens
            ],
        )
    return "\n".join(lines) + "\n"
