"""Training settings as the sweep and the report show and compare them.

One place for how a setting is written in names and tables (:func:`format_value`), how settings
are compared (:func:`freeze`), which settings tell runs apart (:func:`distinguishing_fields`),
and the plain-text table the sweep prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lorafit.config import FIELD_ORDER


def format_value(value: Any) -> str:
    """A setting as it appears in names and tables: floats in %g form, lists joined by "+"."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def freeze(v: Any) -> Any:
    """A hashable copy of a setting: lists become tuples, dicts sorted tuples of pairs."""
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v


def distinguishing_fields(groups: Iterable[list[dict[str, Any]]], ignore: Iterable[str] = ()) -> list[str]:
    """Fields whose values differ inside at least one group, in TrainConfig's field order.

    The sweep uses this to name cells that share task, method, rank, targets and seed; the report
    uses it to label result rows that share model, method, rank, targets and task.
    """
    ignore = set(ignore)
    found: dict[str, None] = {}
    for group in groups:
        for d in group[1:]:
            for k in group[0].keys() | d.keys():
                if k not in ignore and freeze(group[0].get(k)) != freeze(d.get(k)):
                    found[k] = None
    order = {k: i for i, k in enumerate(FIELD_ORDER)}
    return sorted(found, key=lambda k: (order.get(k, len(order)), k))


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns separated by two spaces, for the terminal."""
    cols = [headers] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cols)
