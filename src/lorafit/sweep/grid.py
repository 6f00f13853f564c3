"""A sweep's grid: the grid file format (or the flags' equivalent), checked key by key.

See :mod:`lorafit.sweep` for the format. Every problem names the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import FIELD_NAMES, PER_RUN_KEYS, RUNTIME_KEYS, TrainConfig
from lorafit.errors import LorafitError
from lorafit.flags import split_commas
from lorafit.io import read_yaml_mapping

SWEEP_FILE = "sweep.yaml"
GRID_KEYS = ("output_dir", "base", "grid", "overrides", "cells")


@dataclass
class Grid:
    """A sweep before expansion: what a grid file (or the flags) says."""

    output_dir: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    overrides: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    source: str = "lorafit sweep"  # names the grid in error messages: a file path or the command
    edited: bool = False  # flags changed the grid file's values (overrides may then match nothing)
    # The grid file before axis flags picked a part of it (`--grid G --tasks rte`): the sweep its
    # directory holds and records, so that running it task by task is one sweep, not several.
    whole: Grid | None = None

    def to_yaml(self, cells: list[Cell]) -> str:
        """The resolved grid as a grid file (with the expanded cell names, for the record)."""
        body = {
            "output_dir": self.output_dir,
            "base": self.base,
            "grid": self.axes,
            "overrides": self.overrides,
            "cells": [c.name for c in cells],
        }
        from lorafit import __version__

        head = (
            f"# lorafit sweep --grid {Path(self.output_dir or '.') / SWEEP_FILE}\n"
            f"# The resolved grid of this sweep (lorafit {__version__}). Run the line above to continue it;\n"
            "# 'cells' lists the run directories it expands to (written by lorafit, ignored on input).\n"
        )
        return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


@dataclass
class Cell:
    """One run of the sweep: its directory name (relative to the sweep) and its settings."""

    name: str
    config: TrainConfig
    point: dict[str, Any]  # the axis values it came from
    tags: str = ""  # the name parts that tell it from cells with the same task, method, rank and targets
    model: str = ""  # the model's part of the name, when the grid varies the model

    @property
    def path(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def group(self) -> str:
        """The cell's name without its seed: the cells a median is taken over."""
        return self.name.rsplit("/", 1)[0]


def _targets(value: Any, where: str) -> list[str] | None:
    """A target set from YAML or a flag: a list of names, 'a,b', or null/'default'."""
    if value is None or value == "default":
        return None
    if isinstance(value, str):
        names = split_commas(value)
    elif isinstance(value, list) and all(isinstance(s, str) and s for s in value):
        names = list(value)
    else:
        raise LorafitError(f"{where}: a target set is a list of module names (or null), got {value!r}")
    if not names:
        raise LorafitError(f"{where}: empty target set")
    return names


def _check_settings(settings: Any, where: str) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise LorafitError(
            f"{where}: expected a mapping of TrainConfig fields, got {type(settings).__name__}")
    for key in settings:
        if key == "recipe":
            if not isinstance(settings[key], str) or not settings[key]:
                raise LorafitError(f"{where}.recipe: expected a recipe name or path, got {settings[key]!r}")
            continue
        if key not in FIELD_NAMES:
            raise LorafitError(f"{where}: unknown field {key!r} (known: see `lorafit train --help`)")
        if key in PER_RUN_KEYS:
            hint = "use the grid axis 'seed'" if key == "seeds" else "the sweep sets it for every cell"
            raise LorafitError(f"{where}: {key!r} cannot be set here ({hint})")
    settings = dict(settings)
    if "target_modules" in settings:
        settings["target_modules"] = _targets(settings["target_modules"], f"{where}.target_modules")
    if isinstance(settings.get("text_columns"), str):
        settings["text_columns"] = split_commas(settings["text_columns"])
    return settings


def _check_axes(axes: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(axes, dict):
        raise LorafitError(f"{where}: expected a mapping of field: [values], got {type(axes).__name__}")
    out: dict[str, list[Any]] = {}
    for key, values in axes.items():
        if key == "recipe":  # an axis of recipes: e.g. one per task and method
            names_ok = isinstance(values, list) and values and all(v and isinstance(v, str) for v in values)
            if not names_ok:
                raise LorafitError(
                    f"{where}.recipe: expected a non-empty list of recipe names, got {values!r}")
        elif key == "settings":  # an axis of bundles of settings: e.g. one per LoRA variant
            if not isinstance(values, list) or not values:
                raise LorafitError(f"{where}.settings: expected a non-empty list of mappings, got {values!r}")
            values = [_check_settings(v, f"{where}.settings[{i}]") for i, v in enumerate(values)]
        elif key not in FIELD_NAMES:
            raise LorafitError(f"{where}: unknown field {key!r} (known: see `lorafit train --help`)")
        if key in PER_RUN_KEYS or key in RUNTIME_KEYS:
            raise LorafitError(f"{where}: {key!r} cannot be a grid axis")
        if not isinstance(values, list) or not values:
            raise LorafitError(
                f"{where}.{key}: expected a non-empty list of values, e.g. [1, 2], got {values!r}")
        if key == "target_modules":
            values = [_targets(v, f"{where}.{key}") for v in values]
        dup = [v for i, v in enumerate(values) if v in values[:i]]
        if dup:
            raise LorafitError(f"{where}.{key}: value {dup[0]!r} is listed twice")
        out[key] = list(values)
    return out


def _check_overrides(overrides: Any, where: str) -> dict[str, dict[Any, dict[str, Any]]]:
    if not isinstance(overrides, dict):
        raise LorafitError(
            f"{where}: expected a mapping field: {{value: {{settings}}}}, got {type(overrides).__name__}")
    out: dict[str, dict[Any, dict[str, Any]]] = {}
    for key, by_value in overrides.items():
        if key not in FIELD_NAMES or key in PER_RUN_KEYS or key in RUNTIME_KEYS:
            raise LorafitError(f"{where}: {key!r} is not a TrainConfig field a grid can vary")
        if not isinstance(by_value, dict) or not by_value:
            raise LorafitError(f"{where}.{key}: expected a mapping value: {{settings}}, got {by_value!r}")
        out[key] = {v: _check_settings(s, f"{where}.{key}.{v}") for v, s in by_value.items()}
    return out


def grid_root() -> Path:
    """The grids shipped with lorafit."""
    return Path(__file__).parent.parent / "grids"


def list_grids() -> list[str]:
    return sorted(p.stem for p in grid_root().glob("*.yaml"))


def find_grid(name: str | Path) -> Path:
    """A grid file given by path, or by the name of a shipped grid (``minilm-rank``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = grid_root() / f"{name}.yaml"
    if path.suffix not in (".yaml", ".yml") and shipped.is_file():
        return shipped
    raise LorafitError(f"--grid {name}: file not found (shipped grids: {', '.join(list_grids()) or 'none'})")


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (the cells are checked by :func:`expand`)."""
    path = find_grid(path)
    data = read_yaml_mapping(path, f"a grid file (keys {', '.join(GRID_KEYS)})")
    unknown = [k for k in data if k not in GRID_KEYS]
    if unknown:
        raise LorafitError(
            f"{path}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(GRID_KEYS)})")
    output_dir = data.get("output_dir")
    if output_dir is not None and not isinstance(output_dir, str):
        raise LorafitError(f"{path}: output_dir must be a path, got {output_dir!r}")
    return Grid(
        output_dir=output_dir,
        base=_check_settings(data.get("base") or {}, f"{path}: base"),
        axes=_check_axes(data.get("grid") or {}, f"{path}: grid"),
        overrides=_check_overrides(data.get("overrides") or {}, f"{path}: overrides"),
        source=str(path),
    )
