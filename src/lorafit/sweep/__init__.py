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
Axis flags on a grid file pick a part of it (``--grid G --tasks rte``): only those cells run,
and the directory still holds and records the whole grid, so a grid can be run part by part.

Modules: ``grid`` (the grid file and its checks), ``expand`` (cells and their names), ``runner``
(running, resuming, the live summary), ``cli`` (the flags).
"""

from lorafit.sweep.cli import AXIS_FLAGS, add_sweep_arguments, grid_from_args, run_sweep_cli
from lorafit.sweep.expand import expand, identity, resolved
from lorafit.sweep.grid import GRID_KEYS, SWEEP_FILE, Cell, Grid, find_grid, grid_root, list_grids, load_grid
from lorafit.sweep.runner import check_sweep_dir, format_progress, run_sweep

__all__ = [
    "AXIS_FLAGS",
    "GRID_KEYS",
    "SWEEP_FILE",
    "Cell",
    "Grid",
    "add_sweep_arguments",
    "check_sweep_dir",
    "expand",
    "find_grid",
    "format_progress",
    "grid_from_args",
    "grid_root",
    "identity",
    "list_grids",
    "load_grid",
    "resolved",
    "run_sweep",
    "run_sweep_cli",
]
