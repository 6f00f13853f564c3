"""Expanding a grid into cells: each cell's settings, layered and checked, and its directory name."""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from pathlib import Path
from typing import Any

from lorafit.config import LORA_ONLY, RUNTIME_KEYS, TrainConfig, field_defaults, load_recipe, make_config
from lorafit.errors import LorafitError
from lorafit.settings import VARIANT_FIELDS, distinguishing_fields, format_value, freeze
from lorafit.sweep.grid import Cell, Grid

# Short names for the fields that most often tell cells apart in a directory name.
ABBREVIATIONS = {
    "learning_rate": "lr", "batch_size": "bs", "epochs": "ep", "max_steps": "steps", "alpha": "alpha",
    "weight_decay": "wd", "warmup_ratio": "warmup", "lora_dropout": "dropout", "max_length": "len",
    "max_train_samples": "n", "grad_accum": "accum", "classifier_dropout": "cdrop",
    "init_lora_weights": "init", "loraplus_lr_ratio": "loraplus", "head_learning_rate": "headlr",
    "modules_to_save": "save",
}
# Axis flags: (flag, alias, field). The alias takes the same comma-separated list.


def _matches(value: Any, key: Any) -> bool:
    """Whether an override key (a YAML mapping key) names this field value."""
    if isinstance(value, list):
        return isinstance(key, str) and [s.strip() for s in key.replace("+", ",").split(",")] == value
    if value is None:
        return key is None or key in ("null", "default")
    if isinstance(value, bool) or isinstance(key, bool):
        return value is key
    if isinstance(value, (int, float)):
        try:  # YAML reads a key like 5e-5 (no dot) as text
            return float(value) == float(key)
        except (TypeError, ValueError):
            return False
    return value == key or str(value) == str(key)


_HINTS = typing.get_type_hints(TrainConfig)


def _accepts(hint: Any, kind: type) -> bool:
    """Whether a field's type hint allows values of ``kind`` (Literal[...] of strings counts as str)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return all(isinstance(a, kind) for a in typing.get_args(hint))
    return hint is kind


def _typed(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Numbers YAML read as text (5e-5) made numbers; text fields checked to be text."""
    out = {}
    for key, value in values.items():
        hint = _HINTS.get(key)
        if isinstance(value, str) and _accepts(hint, float) and not _accepts(hint, str):
            try:
                value = float(value)
            except ValueError:
                pass  # TrainConfig names the field and the bad value
        elif value is not None and _accepts(hint, str) and not isinstance(value, str):
            raise LorafitError(f"{where}: {key} must be text, got {value!r}")
        out[key] = value
    return out


def _describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in point.items()) or "(no axes)"


def identity(cfg: TrainConfig | dict[str, Any]) -> tuple:
    """What a run trains: every setting except how it is executed (and where)."""
    values = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    return tuple((k, freeze(v)) for k, v in values.items() if k not in RUNTIME_KEYS)
    return tuple((k, freeze(v)) for k, v in values.items() if k not in RUNTIME_KEYS)


def _name_part(fieldname: str, value: Any) -> str:
    if isinstance(value, bool):
        text = fieldname if value else f"no-{fieldname}"
    else:
        text = f"{ABBREVIATIONS.get(fieldname, fieldname)}{format_value(value) if value is not None else 'none'}"
    return _safe(text)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-._=" else "_" for c in text).strip(".") or "_"


def _base_name(cfg: TrainConfig) -> tuple[str, str, str]:
    from lorafit.data import get_task

    task = cfg.task if cfg.train_file else get_task(cfg.task).name
    method = cfg.method
    if cfg.method == "lora":
        method += f"-r{cfg.rank}"
        if cfg.target_modules is not None:
            method += f"-{format_value(cfg.target_modules)}"
    return _safe(task), _safe(method), f"seed{cfg.seed}"


def expand(grid: Grid) -> list[Cell]:
    """Every distinct cell of the grid, in axis order (the last axis varies fastest).

    Each cell's TrainConfig is built (and so validated) here, before anything runs. An override
    that matches no cell is an error (a typo would silently train the wrong thing), unless flags
    narrowed the grid file's axes.
    """
    cells, unused = _expand(grid)
    if unused and not grid.edited:
        fieldname, key = unused[0]
        raise LorafitError(
            f"{grid.source}: overrides.{fieldname}.{key} matches no cell (no cell has {fieldname}={key!r})"
        )
    return cells


def _expand(grid: Grid) -> tuple[list[Cell], list[tuple[str, Any]]]:
    import torch

    from lorafit.data import get_task

    if not grid.output_dir:
        raise LorafitError(
            f"{grid.source}: no sweep directory: give --output-dir (or output_dir in the grid file)")
    names = list(grid.axes)
    defaults = field_defaults()
    recipes: dict[str, dict[str, Any]] = {}

    def recipe_values(name: str | None) -> dict[str, Any]:
        if not name:
            return {}
        if name not in recipes:
            try:
                recipes[name] = {k: v for k, v in load_recipe(name).items() if k not in RUNTIME_KEYS}
            except LorafitError as e:
                raise LorafitError(f"{grid.source}: {e}") from None
        return recipes[name]

    used: set[tuple[str, Any]] = set()
    cells: dict[tuple, tuple[dict[str, Any], TrainConfig]] = {}
    for combo in itertools.product(*(grid.axes[n] for n in names)):
        point = dict(zip(names, combo))
        where = f"{grid.source}: cell {_describe(point)}"
        flat = {k: v for k, v in point.items() if k != "settings"}
        flat.update(point.get("settings") or {})  # a bundle comes after the other axes
        recipe = recipe_values(flat.get("recipe", grid.base.get("recipe")))
        before = {**defaults, **recipe, **grid.base, **flat}
        changes: dict[str, tuple[Any, str]] = {}
        for fieldname, by_value in grid.overrides.items():
            for key, settings in by_value.items():
                if not _matches(before.get(fieldname), key):
                    continue
                used.add((fieldname, key))
                for k, v in settings.items():
                    origin = f"overrides.{fieldname}.{key}"
                    if k in changes and freeze(changes[k][0]) != freeze(v):
                        raise LorafitError(
                            f"{where}: {changes[k][1]} and {origin} both set {k!r}, to different values")
                    changes[k] = (v, origin)
        settings = {**grid.base, **flat, **{k: v for k, (v, _) in changes.items()}}
        values = {**recipe_values(settings.pop("recipe", None)), **settings}
        if values.get("method", defaults["method"]) == "full":
            for k in LORA_ONLY:
                values.pop(k, None)
        values = _typed(values, where)
        try:
            cfg = make_config(None, **values)
            if not cfg.train_file:
                get_task(cfg.task)
        except (LorafitError, TypeError) as e:
            raise LorafitError(f"{where}: {e}") from None
        if cfg.precision == "fp16" and not torch.cuda.is_available():
            raise LorafitError(f"{where}: precision fp16 needs a GPU; on the CPU use bf16 or fp32")
        cells.setdefault(identity(cfg), (point, cfg))
    unused = [(f, k) for f, by_value in grid.overrides.items() for k in by_value if (f, k) not in used]
    return _name_cells(grid, list(cells.values())), unused


def resolved(grid: Grid) -> Grid:
    """The grid as it ran: without the overrides that match none of its cells."""
    _, unused = _expand(grid)
    overrides = {f: {k: s for k, s in by_value.items() if (f, k) not in unused}
                 for f, by_value in grid.overrides.items()}
    return dataclasses.replace(grid, overrides={f: v for f, v in overrides.items() if v})


def _name_cells(grid: Grid, cells: list[tuple[dict[str, Any], TrainConfig]]) -> list[Cell]:
    by_base: dict[tuple, list[dict[str, Any]]] = {}
    for _, cfg in cells:
        by_base.setdefault(_base_name(cfg), []).append(dict(identity(cfg)))
    extra = [f for f in distinguishing_fields(by_base.values(), ignore=("model",)) if f != "model"]
    vary_model = len({cfg.model for _, cfg in cells}) > 1
    out: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for point, cfg in cells:
        task, method, seed = _base_name(cfg)
        tags = [_name_part(f, getattr(cfg, f)) for f in extra
                if not (cfg.method == "full" and f in LORA_ONLY)
                and not (f in VARIANT_FIELDS and getattr(cfg, f) == field_defaults()[f])]
        model = _safe(Path(cfg.model).name or cfg.model) if vary_model else ""
        name = "/".join(([model] if model else []) + [task, "-".join([method, *tags]), seed])
        if name in seen:
            raise LorafitError(
                f"{grid.source}: two different cells would share the directory {name} "
                f"({_describe(seen[name])} and {_describe(point)}); make the grid values distinct"
            )
        seen[name] = point
        cfg = cfg.replace(output_dir=str(Path(grid.output_dir) / name))
        out.append(Cell(name, cfg, point, "-".join(tags), model))
    return out
