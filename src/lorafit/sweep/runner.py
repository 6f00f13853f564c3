"""Running a sweep: refusing a directory that holds another grid, skipping finished cells,
resuming or restarting stopped ones, and the live summary of medians so far."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from lorafit.config import TrainConfig
from lorafit.errors import LorafitError
from lorafit.io import atomic_write_bytes
from lorafit.run import RunDir
from lorafit.settings import text_table
from lorafit.sweep.expand import expand, resolved
from lorafit.sweep.grid import SWEEP_FILE, Cell, Grid


def _changed_settings(cell: Cell) -> list[str]:
    """Settings that differ between the cell and the run already in its directory (none when
    its config.yaml is missing or unreadable)."""
    try:
        return RunDir(cell.path).changed_settings(cell.config)
    except LorafitError:
        return []


def recorded_cells(root: Path) -> list[str]:
    """The cell names of the sweep recorded in ``root`` (its sweep.yaml), or [] if none."""
    record = root / SWEEP_FILE
    if not record.is_file():
        return []
    try:
        data = yaml.safe_load(record.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise LorafitError(f"{record}: not valid YAML; delete it or pass --overwrite") from None
    return [str(n) for n in (data.get("cells") or [])] if isinstance(data, dict) else []


def sweep_scope(grid: Grid, cells: list[Cell]) -> tuple[Grid, list[Cell]]:
    """The sweep that ``cells`` are a part of: the whole grid file when axis flags picked some of
    its cells (``--grid G --tasks rte``), else the grid itself."""
    if grid.whole is not None:
        whole_cells = expand(grid.whole)
        if {c.name for c in cells} <= {c.name for c in whole_cells}:
            return grid.whole, whole_cells
    return grid, cells


def check_sweep_dir(grid: Grid, cells: list[Cell], overwrite: bool) -> list[Path]:
    """Refuse to mix grids in one directory; with ``overwrite``, the run directories to delete.

    Adding cells to a sweep is allowed (more seeds, more ranks): the old cells keep their runs.
    Running a part of a sweep is allowed too: ``--tasks rte`` on the recorded sweep or on the
    grid file it came from (so a grid can be run task by task); only those cells run and the
    others stay as they are. Refused without --overwrite: a cell directory holding a run with
    other settings, and an earlier sweep.yaml with cells this grid does not have while it also
    has cells that one does not. --overwrite deletes exactly the runs of those cells.
    """
    root = Path(grid.output_dir)
    if root.exists() and not root.is_dir():
        raise LorafitError(f"--output-dir {root}: exists and is not a directory")
    conflicts = [(c, changed) for c in cells if (changed := _changed_settings(c))]
    record = root / SWEEP_FILE
    old_cells = recorded_cells(root)
    names = {c.name for c in cells}
    scope = {c.name for c in sweep_scope(grid, cells)[1]}
    dropped = [n for n in old_cells if n not in scope]
    if dropped and not conflicts and not overwrite and names <= set(old_cells):
        return []  # a part of the recorded sweep (e.g. --tasks rte): the other cells stay as they are
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
        if path.resolve().is_relative_to(root.resolve()) and path.is_dir() and RunDir(path).is_run_dir():
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


def job_threads(jobs: int) -> int:
    """Threads for each of ``jobs`` cells run at once: their share of the physical cores.

    Not of the logical CPUs: two hyper-threads share one core's matrix units, so a job a
    hyper-thread would only contend (``lorafit train`` alone also takes the physical cores).
    """
    from lorafit.bench.env import physical_cores

    return max(1, physical_cores() // jobs)


def _run_parallel(todo: list[tuple[str, Cell, TrainConfig]], cells: list[Cell], jobs: int,
                  say: Callable[[str], None]) -> None:
    """Run cells in ``jobs`` worker processes, each with its share of the CPU threads.

    Small models on a CPU use cores better as separate single-threaded runs than as one run on
    all cores (per-op threading overhead dominates short sequences). Each worker is a fresh
    process (spawn), so a crash or a memory spike stays in its cell.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = job_threads(jobs)
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
    def say(text: str) -> None:
        if echo is not None:
            echo(text)
        else:
            print(text, flush=True)

    from lorafit.paths import check_output
    from lorafit.train import output_inputs

    cells = expand(grid)
    root = Path(grid.output_dir)
    # Before anything is deleted: no cell may write onto, over or inside what a cell reads.
    check_output("--output-dir", root, [x for c in cells for x in output_inputs(c.config)])
    doomed = check_sweep_dir(grid, cells, overwrite)
    for path in doomed:
        shutil.rmtree(path)
        say(f"removed {path} (--overwrite)")
    recorded = set(recorded_cells(root))
    whole, whole_cells = sweep_scope(grid, cells)
    if not overwrite and recorded > {c.name for c in whole_cells}:
        say(f"sweep {root}: running {len(cells)} of the {len(recorded)} cells of {root / SWEEP_FILE}")
    else:
        atomic_write_bytes(root / SWEEP_FILE, resolved(whole).to_yaml(whole_cells).encode())
        if len(whole_cells) > len(cells):
            say(f"sweep {root}: running {len(cells)} of the {len(whole_cells)} cells of {grid.source}")

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
            step = run.checkpoint_step()
            step = "?" if step is None else step
            cfg = cfg.replace(resume=True)
            say(f"{head}: resuming from its checkpoint (step {step})")
        elif cell.path.is_dir() and RunDir(cell.path).is_run_dir():
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
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    show_model = any(c.model for c in cells)
    show_tags = any(c.tags for c in cells)
    rows = []
    for members in groups.values():
        summaries = [s for c in members if (s := RunDir(c.path).summary()) and s.get("status") == "finished"]
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
