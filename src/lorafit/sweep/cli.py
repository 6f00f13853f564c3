"""``lorafit sweep``'s flags: the grid from a file, from axis flags, or both (flags win)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

from lorafit.config import PER_RUN_KEYS, TrainConfig
from lorafit.errors import LorafitError
from lorafit.flags import add_dataclass_arguments, comma_list
from lorafit.settings import format_value
from lorafit.sweep.grid import SWEEP_FILE, Grid, _targets, list_grids, load_grid

# Axis flags: (flag, alias, field). The alias takes the same comma-separated list.
AXIS_FLAGS = (
    ("--tasks", "--task", "task"),
    ("--methods", "--method", "method"),
    ("--ranks", "--rank", "rank"),
    ("--targets", "--target-modules", "target_modules"),
    ("--learning-rates", "--learning-rate", "learning_rate"),
    ("--seeds", "--seed", "seed"),
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
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
                   help="cells to train at once, each in its own process with cores/jobs threads (default: 1). "
                        "On a CPU, one job a core trains small models faster: 1.14x for --jobs 2 on 2 "
                        "cores (docs/performance.md)")
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
    kinds = {"task": (str, "task names"), "method": (str, "methods"), "rank": (int, "integers"),
             "learning_rate": (float, "numbers"), "seed": (int, "integers")}
    for flag, alias, name in AXIS_FLAGS:
        if name == "target_modules":
            g.add_argument(flag, alias, dest="axis_target_modules", action="append", metavar="A,B",
                           help=helps[name])
        else:
            g.add_argument(flag, alias, dest=f"axis_{name}", type=comma_list(*kinds[name], allow_empty=False), metavar="A,B",
                           help=helps[name])
    t = parser.add_argument_group("training settings for every cell (as in `lorafit train`)")
    t.add_argument("--recipe", help="a recipe below the grid's settings (shipped name or path)")
    skip = {name for _, _, name in AXIS_FLAGS} | PER_RUN_KEYS
    add_dataclass_arguments(t, TrainConfig, skip=skip)


def _select_bundles(grid: Grid, flag: str, name: str, values: list) -> bool:
    """An axis flag on a grid whose settings bundles set that field selects the bundles.

    ``--tasks rte`` on a grid of bundles such as ``{task: rte, learning_rate: 2.5e-4}`` keeps the
    bundles with those values (a bundle's own value wins over an axis, so setting the axis
    would silently change nothing). Returns True when every kept bundle sets the field, so no
    axis is needed.
    """
    bundles = grid.axes.get("settings")
    if not isinstance(bundles, list) or not any(isinstance(b, dict) and name in b for b in bundles):
        return False
    kept = [b for b in bundles if not isinstance(b, dict) or name not in b or b[name] in values]
    if not kept:
        shown = ", ".join(format_value(v) if v is not None else "default" for v in values)
        raise LorafitError(f"{flag} {shown}: no settings bundle of the grid has {name} {shown} "
                           f"(its bundles have {', '.join(sorted({format_value(b[name]) for b in bundles if name in b}))})")
    grid.axes["settings"] = kept
    return all(isinstance(b, dict) and name in b for b in kept)


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
    whole = copy.deepcopy(grid) if path and axis_flags else None
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
        grid.base.pop(name, None)
        if not _select_bundles(grid, flag, name, values):
            grid.axes[name] = values
    edited = _apply_training_flags(grid, args) or edited
    grid.edited = edited
    if whole is not None:
        whole.edited = _apply_training_flags(whole, args)
        grid.whole = whole
    return grid


def _apply_training_flags(grid: Grid, args: argparse.Namespace) -> bool:
    """Set --recipe and the training flags on every cell; True if that changed the file's values."""
    edited = False
    if getattr(args, "recipe", None):
        grid.base["recipe"] = args.recipe
        edited = "recipe" in grid.axes or bool(grid.overrides)
        grid.axes.pop("recipe", None)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in PER_RUN_KEYS and hasattr(args, f.name):  # given (training flags default to "absent")
            grid.base[f.name] = getattr(args, f.name)
            edited = edited or f.name in grid.axes or f.name in grid.overrides
            grid.axes.pop(f.name, None)  # a training flag fixes the field for every cell
    return edited


def run_sweep_cli(args: argparse.Namespace) -> int:
    from lorafit.sweep.runner import run_sweep

    grid = grid_from_args(args)
    if args.process_entry:  # every cell runs in this process or in workers it starts
        from lorafit.allocator import relaunch_as_asked, run_device_type

        relaunch_as_asked(grid.base.get("allocator", "auto"), run_device_type(grid.base.get("device", "auto")))
    from lorafit.distributed import refuse_launched  # after starting again: it imports torch

    refuse_launched("sweep", "run it directly (its cells train one after another); to spread one cell over "
                    "several processes, launch `lorafit train` with that cell's settings")
    try:
        run_sweep(grid, overwrite=args.overwrite, jobs=args.jobs)
    except KeyboardInterrupt:
        print("lorafit: sweep interrupted; run the same command again to continue it "
              "(finished cells are kept, the current one resumes from its last checkpoint)", file=sys.stderr)
        return 130
    return 0
