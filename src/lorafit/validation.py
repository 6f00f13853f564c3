"""Type checks for settings, driven by the field types of a dataclass.

One function covers every field of :class:`lorafit.config.TrainConfig`, whether the value came
from a flag, a YAML recipe or a run's ``config.yaml``: an ``int`` field takes an integer (not a
bool), a ``float`` field a finite number, a ``list[str]`` field a list of strings, a ``Literal``
one of its values, and ``X | None`` also ``None``. Ranges stay with the dataclass, which knows them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from lorafit.errors import LorafitError
from lorafit.flags import flag_name


class FieldError(LorafitError):
    """A bad value of one named field (so a caller can say which file it came from)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is a valid value of the annotation ``tp`` (floats must be finite)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in get_args(tp))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(fits(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def check_fields(cls: type, values: dict[str, Any], name: Callable[[str], str] = flag_name) -> None:
    """Refuse the first value in ``values`` that does not fit its field's type.

    Args:
        cls: The dataclass whose field annotations are the rules.
        values: Field name to value (unknown names are the caller's to refuse).
        name: How to name a field in the message (the flag, or ``file: field 'x'``).

    Raises:
        FieldError: naming the field, the expected type and the value given.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and not fits(values[f.name], hints[f.name]):
            value = values[f.name]
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise FieldError(f.name, f"{name(f.name)} must be {_describe(hints[f.name])}, got {shown}")


def coerce_numbers(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Integers given for ``float`` fields become floats (YAML's ``alpha: 16``)."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        floaty = tp is float or (get_origin(tp) in (typing.Union, types.UnionType) and float in get_args(tp))
        value = out.get(f.name)
        if floaty and isinstance(value, int) and not isinstance(value, bool):
            out[f.name] = float(value)
    return out
