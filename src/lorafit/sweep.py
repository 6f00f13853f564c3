"""``lorafit sweep``: a grid of training runs, one ordinary run directory per cell, resumable.

A grid is given as a YAML file (``--grid FILE``, or the name of a grid shipped in
``lorafit/grids``) or as flags; both build the same :class:`Grid`::

    # lorafit sweep --grid my-grid.yaml
    output_dir: runs/sweep-minilm          # the sweep directory (relative: to the current directory)
    base:                                  # TrainConfig fields shared by every cell
      recipe: minilm/mrpc                  #   optional: a recipe below them
      epochs: 10
    grid:                                  # axes: lists of values of any TrainConfig field, or of recipes
      task: [mrpc, rte]
      method: [lora, full]
      rank: [1, 2, 4, 8]
      target_modules: [[query, value], [query, key]]   # null: the architecture's default
      seed: [0, 1, 2]
      settings:                            #   an axis of setting bundles (e.g. LoRA variants), applied
        - {}                               #   after the other axes: a bundle may pin a field they vary
        - {use_dora: true, learning_rate: 1.0e-3}
    overrides:                             # FIELD: {VALUE: settings for the cells where FIELD is VALUE}
      method:
        full: {learning_rate: 5.0e-5}
      task:
        rte: {max_train_samples: 1000}

A cell's settings are layered: dataclass defaults < recipe < ``base`` < axis values < matching
``overrides`` (two overrides of one cell may not disagree; an override matching no cell is an
error). Full fine-tuning ignores the LoRA fields, so they are reset to their defaults in
``method: full`` cells, and cells whose settings end up identical run once: full cells are not
multiplied by the rank and target axes. Every cell's TrainConfig is built before anything runs.

Each cell is a run directory ``<output_dir>/<task>/<method>[-r<rank>][-<targets>][-<field><value>...]
/seed<seed>``: the targets when given explicitly, and ``-<field><value>`` parts only for fields
that tell otherwise identical cells apart (``-lr0.0005`` when the learning rate is swept); a model
folder comes first when the grid varies the model. ``<output_dir>/sweep.yaml`` records the
resolved grid and is itself a grid file: ``lorafit sweep --grid <output_dir>/sweep.yaml``, or
just ``lorafit sweep --output-dir <output_dir>``, continues the sweep.

Running again continues: finished cells are skipped, a cell with a checkpoint resumes from it,
and a cell stopped before its first checkpoint starts again. A sweep directory may grow (more
seeds, ranks or tasks), but a grid that would change the settings of a run already there, or
drop cells of the recorded grid, is refused unless ``--overwrite`` (which deletes those runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import statistics
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.io import read_yaml_mapping
from lorafit.config import FIELD_NAMES, RUNTIME_KEYS, TrainConfig, load_recipe, make_config
from lorafit.errors import LorafitError

SWEEP_FILE = "sweep.yaml"
GRID_KEYS = ("output_dir", "base", "grid", "overrides", "cells")
# Set by the sweep itself (the cell's directory, whether to resume), never by a grid.
SWEEP_OWNED = {"output_dir", "overwrite", "resume", "seeds"}
# How a run is executed, not what it trains: may differ between a sweep and its continuation.
RUNTIME = set(RUNTIME_KEYS)
# Fields that only matter for method "lora"; full fine-tuning cells get their defaults.
LORA_ONLY = ("rank", "alpha", "lora_dropout", "target_modules", "use_rslora", "init_adapter", "modules_to_save",
             "use_dora", "init_lora_weights", "loraplus_lr_ratio")
# The settings that make a LoRA variant (rsLoRA, DoRA, LoRA+, PiSSA): named in a cell only when set.
VARIANT_FIELDS = ("use_rslora", "use_dora", "init_lora_weights", "loraplus_lr_ratio")
# Short names for the fields that most often tell cells apart in a directory name.
ABBREVIATIONS = {
    "learning_rate": "lr", "batch_size": "bs", "epochs": "ep", "max_steps": "steps", "alpha": "alpha",
    "weight_decay": "wd", "warmup_ratio": "warmup", "lora_dropout": "dropout", "max_length": "len",
    "max_train_samples": "n", "grad_accum": "accum", "classifier_dropout": "cdrop",
    "init_lora_weights": "init", "loraplus_lr_ratio": "loraplus",
}
# Axis flags: (flag, alias, field). The alias takes the same comma-separated list.
AXIS_FLAGS = (
    ("--tasks", "--task", "task"),
    ("--methods", "--method", "method"),
    ("--ranks", "--rank", "rank"),
    ("--targets", "--target-modules", "target_modules"),
    ("--learning-rates", "--learning-rate", "learning_rate"),
    ("--seeds", "--seed", "seed"),
)
DEFAULTS = TrainConfig().to_dict()


# -- the grid ---------------------------------------------------------------------------------


@dataclass
class Grid:
    """A sweep before expansion: what a grid file (or the flags) says."""

    output_dir: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    overrides: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    source: str = "lorafit sweep"  # names the grid in error messages: a file path or the command
    edited: bool = False  # flags changed the grid file's values (overrides may then match nothing)

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
        names = [s.strip() for s in value.split(",") if s.strip()]
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
        if key in SWEEP_OWNED:
            hint = "use the grid axis 'seed'" if key == "seeds" else "the sweep sets it for every cell"
            raise LorafitError(f"{where}: {key!r} cannot be set here ({hint})")
    settings = dict(settings)
    if "target_modules" in settings:
        settings["target_modules"] = _targets(settings["target_modules"], f"{where}.target_modules")
    if isinstance(settings.get("text_columns"), str):
        settings["text_columns"] = [s.strip() for s in settings["text_columns"].split(",") if s.strip()]
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
        if key in SWEEP_OWNED or key in RUNTIME:
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
        if key not in FIELD_NAMES or key in SWEEP_OWNED or key in RUNTIME:
            raise LorafitError(f"{where}: {key!r} is not a TrainConfig field a grid can vary")
        if not isinstance(by_value, dict) or not by_value:
            raise LorafitError(f"{where}.{key}: expected a mapping value: {{settings}}, got {by_value!r}")
        out[key] = {v: _check_settings(s, f"{where}.{key}.{v}") for v, s in by_value.items()}
    return out


def grid_root() -> Path:
    """The grids shipped with lorafit."""
    return Path(__file__).parent / "grids"


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


# -- expansion --------------------------------------------------------------------------------


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


def format_value(value: Any) -> str:
    """A setting as it appears in names and tables: floats in %g form, lists joined by "+"."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def identity(cfg: TrainConfig | dict[str, Any]) -> tuple:
    """What a run trains: every setting except how it is executed (and where)."""
    values = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    return tuple((k, freeze(v)) for k, v in values.items() if k not in RUNTIME)


def freeze(v: Any) -> Any:
    """A hashable copy of a setting: lists become tuples, dicts sorted tuples of pairs."""
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    return v


def distinguishing_fields(groups: Iterable[list[dict[str, Any]]], ignore: Iterable[str] = ()) -> list[str]:
    """Fields whose values differ inside at least one group, in the order of the first dict's keys.

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
    order = {k: i for i, k in enumerate(DEFAULTS)}
    return sorted(found, key=lambda k: (order.get(k, len(order)), k))


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
    recipes: dict[str, dict[str, Any]] = {}

    def recipe_values(name: str | None) -> dict[str, Any]:
        if not name:
            return {}
        if name not in recipes:
            try:
                recipes[name] = {k: v for k, v in load_recipe(name).items() if k not in RUNTIME}
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
        before = {**DEFAULTS, **recipe, **grid.base, **flat}
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
        if values.get("method", DEFAULTS["method"]) == "full":
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
                and not (f in VARIANT_FIELDS and getattr(cfg, f) == DEFAULTS[f])]
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


# -- running ----------------------------------------------------------------------------------


def _is_run_dir(path: Path) -> bool:
    names = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.new")
    return any((path / n).exists() for n in names)


def _saved_config(path: Path) -> dict[str, Any] | None:
    file = path / "config.yaml"
    if not file.is_file():
        return None
    try:
        saved = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return saved if isinstance(saved, dict) else None


def _changed_settings(cell: Cell) -> list[str]:
    """Settings that differ between the cell and the run already in its directory."""
    saved = _saved_config(cell.path)
    if saved is None:
        return []
    return sorted(k for k, v in cell.config.to_dict().items() if k not in RUNTIME and saved.get(k) != v)


def check_sweep_dir(grid: Grid, cells: list[Cell], overwrite: bool) -> list[Path]:
    """Refuse to mix grids in one directory; with ``overwrite``, the run directories to delete.

    Adding cells to a sweep is allowed (more seeds, more ranks): the old cells keep their runs.
    Refused without --overwrite: a cell directory holding a run with other settings, and an
    earlier sweep.yaml with cells this grid does not have. --overwrite deletes exactly those runs.
    """
    root = Path(grid.output_dir)
    if root.exists() and not root.is_dir():
        raise LorafitError(f"--output-dir {root}: exists and is not a directory")
    conflicts = [(c, changed) for c in cells if (changed := _changed_settings(c))]
    old_cells: list[str] = []
    record = root / SWEEP_FILE
    if record.is_file():
        try:
            data = yaml.safe_load(record.read_text(encoding="utf-8")) or {}
            old_cells = [str(n) for n in (data.get("cells") or [])] if isinstance(data, dict) else []
        except yaml.YAMLError:
            raise LorafitError(f"{record}: not valid YAML; delete it or pass --overwrite") from None
    names = {c.name for c in cells}
    dropped = [n for n in old_cells if n not in names]
    if (conflicts or dropped) and not overwrite:
        lines = []
        if conflicts:
            fields = sorted({f for _, changed in conflicts for f in changed})
            lines.append(f"{len(conflicts)} run(s) there were trained with other {', '.join(fields)} "
                         f"(e.g. {conflicts[0][0].name})")
        if dropped:
            lines.append(f"{len(dropped)} cell(s) of {record} are not in this grid (e.g. {dropped[0]})")
        raise LorafitError(
            f"--output-dir {root}: holds a different sweep: {'; '.join(lines)}. Continue that sweep with "
            f"`lorafit sweep --grid {record}` (flags after it change it, e.g. --seeds 0,1,2 adds seeds), use "
            "another --output-dir, or pass --overwrite to delete those runs (adding cells to a sweep needs "
            "no flag)"
        )
    doomed = [c.path for c, _ in conflicts]
    for name in dropped:
        path = root / name
        if path.resolve().is_relative_to(root.resolve()) and path.is_dir() and _is_run_dir(path):
            doomed.append(path)
    return doomed


def _train_cell(name: str, cfg: TrainConfig) -> None:
    from lorafit.train import train

    try:
        train(cfg)
    except LorafitError as e:
        raise LorafitError(f"sweep cell {name}: {e}") from None


def _quiet_worker() -> None:
    """Workers share the sweep's terminal: Transformers' per-cell load and save bars would interleave."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _run_parallel(todo: list[tuple[str, Cell, TrainConfig]], cells: list[Cell], jobs: int,
                  say: Callable[[str], None]) -> None:
    """Run cells in ``jobs`` worker processes, each with its share of the CPU threads.

    Small models on a CPU use cores better as separate single-threaded runs than as one run on
    all cores (per-op threading overhead dominates short sequences). Each worker is a fresh
    process (spawn), so a crash or a memory spike stays in its cell.
    """
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_quiet_worker) as pool:
        running = {}
        for head, cell, cfg in todo:
            cfg = cfg.replace(progress=False, num_threads=cfg.num_threads or threads)
            running[pool.submit(_train_cell, cell.name, cfg)] = head
            say(f"{head}: queued")
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                head = running.pop(future)
                future.result()  # a failed cell stops the sweep with its error
                say(f"{head}: finished")
                say(format_progress(cells))


def run_sweep(grid: Grid, overwrite: bool = False, echo: Callable[[str], None] | None = None,
              jobs: int = 1) -> list[Cell]:
    """Expand, check and run the grid (``jobs`` cells at a time); returns the cells."""
    from lorafit.io import atomic_write_bytes, read_json
    from lorafit.run import RunDir

    def say(text: str) -> None:
        if echo is not None:
            echo(text)
        else:
            print(text, flush=True)

    cells = expand(grid)
    doomed = check_sweep_dir(grid, cells, overwrite)
    root = Path(grid.output_dir)
    for path in doomed:
        shutil.rmtree(path)
        say(f"removed {path} (--overwrite)")
    atomic_write_bytes(root / SWEEP_FILE, resolved(grid).to_yaml(cells).encode())

    finished = sum(RunDir(c.path).is_finished() for c in cells)
    say(f"sweep {root}: {len(cells)} cells, {finished} finished, {len(cells) - finished} to run")
    if finished:
        say(format_progress(cells))
    started = time.perf_counter()
    todo: list[tuple[str, Cell, TrainConfig]] = []
    for i, cell in enumerate(cells, 1):
        run = RunDir(cell.path)
        head = f"[{i}/{len(cells)}] {cell.name}"
        if run.is_finished():
            say(f"{head}: finished, skipped")
            continue
        cfg = cell.config
        if run.has_checkpoint():
            try:
                step = read_json(cell.path / "checkpoint" / "state.json").get("step")
            except LorafitError:
                step = "?"
            cfg = cfg.replace(resume=True)
            say(f"{head}: resuming from its checkpoint (step {step})")
        elif cell.path.is_dir() and _is_run_dir(cell.path):
            cfg = cfg.replace(overwrite=True)  # killed before its first checkpoint: start clean
            say(f"{head}: starting again (stopped before its first checkpoint)")
        todo.append((head, cell, cfg))
    if jobs <= 1:
        for head, cell, cfg in todo:
            say(f"{head}: training")
            _train_cell(cell.name, cfg)
            say(format_progress(cells))
    else:
        _run_parallel(todo, cells, jobs, say)
    trained = len(todo)
    done = sum(RunDir(c.path).is_finished() for c in cells)
    say(f"sweep {root}: {done}/{len(cells)} cells finished ({trained} trained now, "
        f"{time.perf_counter() - started:.0f} s); tables and plots: lorafit report {root}")
    return cells


def format_progress(cells: list[Cell]) -> str:
    """The live summary: one line per cell group (all but the seed), with the median so far."""
    from lorafit.io import read_json
    from lorafit.run import RunDir

    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    show_model = any(c.model for c in cells)
    show_tags = any(c.tags for c in cells)
    rows = []
    for members in groups.values():
        summaries = [read_json(c.path / "summary.json") for c in members if RunDir(c.path).is_finished()]
        if not summaries:
            continue
        cell, cfg = members[0], members[0].config
        values = [100 * s["best_metric"] for s in summaries if s.get("best_metric") is not None]
        row = [cell.model] if show_model else []
        row += [
            summaries[0].get("task", cfg.task),
            cfg.method,
            str(cfg.rank) if cfg.method == "lora" else "-",
            "-" if cfg.method != "lora" else "+".join(cfg.target_modules or ["default"]),
        ]
        row += [cell.tags or "-"] if show_tags else []
        row += [
            f"{len(summaries)}/{len(members)}",
            summaries[0].get("metric", "?"),
            f"{statistics.median(values):.1f}" if values else "-",
        ]
        rows.append(row)
    if not rows:
        return "no cell finished yet"
    headers = (["model"] if show_model else []) + ["task", "method", "rank", "targets"]
    headers += (["settings"] if show_tags else []) + ["seeds", "metric", "median %"]
    return text_table(headers, rows)


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cols = [headers] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cols)


# -- command line -----------------------------------------------------------------------------


def _comma(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            values = [kind(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    parse.__name__ = f"comma-separated {what}"
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from lorafit.cli import add_dataclass_arguments

    parser.description = (
        "Run a grid of training runs (tasks x methods x ranks x target sets x learning rates x seeds), "
        "one run directory per cell, in this process, one after another. Rerun the same command to "
        "continue a stopped sweep: finished cells are skipped and an interrupted one resumes."
    )
    g = parser.add_argument_group("grid")
    g.add_argument("--grid", metavar="FILE",
                   help="YAML grid file (output_dir, base, grid, overrides), or the name of a shipped grid "
                        f"({', '.join(list_grids())}); the flags below replace its values")
    g.add_argument("--output-dir", metavar="DIR",
                   help="the sweep directory (default: the grid file's output_dir); given alone, continues "
                        "the sweep in DIR")
    g.add_argument("--jobs", type=_positive_int, default=1,
                   help="cells to train at once, each in its own process with cores/jobs threads (default: 1)")
    g.add_argument("--overwrite", action="store_true",
                   help="make DIR match this grid: delete runs with other settings and cells of an earlier "
                        "grid that this one lacks (identical finished cells are kept)")
    helps = {
        "task": "GLUE tasks, e.g. mrpc,rte",
        "method": "lora and/or full; full cells are not multiplied by ranks and targets",
        "rank": "LoRA ranks, e.g. 1,2,4,8",
        "target_modules": "one target set, e.g. query,value ('default': the architecture's); repeat for more",
        "learning_rate": "peak learning rates, e.g. 1e-4,5e-4",
        "seed": "seeds, e.g. 0,1,2 (the report takes the median over them)",
    }
    kinds = {"task": _comma(str, "task names"), "method": _comma(str, "methods"),
             "rank": _comma(int, "integers"), "learning_rate": _comma(float, "numbers"),
             "seed": _comma(int, "integers")}
    for flag, alias, name in AXIS_FLAGS:
        if name == "target_modules":
            g.add_argument(flag, alias, dest="axis_target_modules", action="append", metavar="A,B",
                           help=helps[name])
        else:
            g.add_argument(flag, alias, dest=f"axis_{name}", type=kinds[name], metavar="A,B",
                           help=helps[name])
    t = parser.add_argument_group("training settings for every cell (as in `lorafit train`)")
    t.add_argument("--recipe", help="a recipe below the grid's settings (shipped name or path)")
    skip = {name for _, _, name in AXIS_FLAGS} | SWEEP_OWNED
    add_dataclass_arguments(t, TrainConfig, skip=skip)


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The grid the command line asks for: the --grid file (if any) with the flags on top."""
    axis_flags = any(getattr(args, f"axis_{n}", None) is not None for _, _, n in AXIS_FLAGS)
    path = args.grid
    if not path and not axis_flags:
        # `lorafit sweep --output-dir DIR` continues the sweep in DIR.
        if not args.output_dir or not (Path(args.output_dir) / SWEEP_FILE).is_file():
            raise LorafitError("sweep: give a grid file (--grid FILE), or axes (--tasks, --ranks, ...) and "
                               "--output-dir, or the --output-dir of a sweep to continue")
        path = Path(args.output_dir) / SWEEP_FILE
    grid = load_grid(path) if path else Grid(source="lorafit sweep")
    if args.output_dir:
        grid.output_dir = args.output_dir
    edited = False
    for flag, _, name in AXIS_FLAGS:
        values = getattr(args, f"axis_{name}", None)
        if values is None:
            continue
        edited = True
        if name == "target_modules":
            values = [_targets(v, flag) for v in values]
        dup = [v for i, v in enumerate(values) if v in values[:i]]
        if dup:
            shown = format_value(dup[0]) if dup[0] is not None else "default"
            raise LorafitError(f"{flag}: value {shown} is given twice")
        grid.axes[name] = values
        grid.base.pop(name, None)
    if getattr(args, "recipe", None):
        grid.base["recipe"] = args.recipe
        edited = edited or "recipe" in grid.axes or bool(grid.overrides)
        grid.axes.pop("recipe", None)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in SWEEP_OWNED and hasattr(args, f.name):  # given (training flags default to "absent")
            grid.base[f.name] = getattr(args, f.name)
            edited = edited or f.name in grid.axes or f.name in grid.overrides
            grid.axes.pop(f.name, None)  # a training flag fixes the field for every cell
    grid.edited = edited
    return grid


def run_sweep_cli(args: argparse.Namespace) -> int:
    grid = grid_from_args(args)
    try:
        run_sweep(grid, overwrite=args.overwrite, jobs=args.jobs)
    except KeyboardInterrupt:
        print("lorafit: sweep interrupted; run the same command again to continue it "
              "(finished cells are kept, the current one resumes from its last checkpoint)", file=sys.stderr)
        return 130
    return 0
