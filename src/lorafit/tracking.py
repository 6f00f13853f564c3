"""Experiment tracking through Accelerate's trackers (``--report-to``).

``tensorboard`` writes event files into ``<run>/tensorboard/``; ``wandb`` and ``mlflow`` log to
the project ``lorafit`` with the run directory's name. The run config is stored as the
hyperparameters; training logs ``train/loss``, ``train/learning_rate`` and
``train/examples_per_second`` every ``--log-steps`` steps, and every evaluation logs each dev
metric as ``eval/<metric>``, all at the optimizer step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lorafit.config import TrainConfig
from lorafit.errors import LorafitError

__all__ = ["TRACKERS", "accelerator_kwargs", "check_tracker", "hyperparameters", "start_tracking"]

# --report-to value -> (the package it needs, how to install it).
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install 'lorafit[track]'"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}
PROJECT = "lorafit"
TENSORBOARD_DIR = "tensorboard"


def check_tracker(report_to: str) -> None:
    """Fail early, naming the flag, when the tracker's package is not installed.

    Accelerate would otherwise drop an unavailable tracker without a word.
    """
    if report_to == "none":
        return
    if report_to not in TRACKERS:
        raise LorafitError(f"--report-to must be one of none, {', '.join(TRACKERS)}; got {report_to!r}")
    package, install = TRACKERS[report_to]
    if importlib.util.find_spec(package) is None:
        raise LorafitError(f"--report-to {report_to}: the {package!r} package is not installed ({install})")


def accelerator_kwargs(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)`` that turn tracking on (none for ``none``)."""
    if cfg.report_to == "none":
        return {}
    return {"log_with": cfg.report_to, "project_dir": str(run_dir)}


def hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """The run config as tracker hyperparameters: scalars and strings only (lists joined)."""
    out: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = "none" if value is None else value
    return out


def start_tracking(accelerator: Any, cfg: TrainConfig, run_dir: Path) -> None:
    """Open the tracker's run and record the config (main process only, inside Accelerate)."""
    if cfg.report_to == "none":
        return
    # TensorBoard's "project" is the folder under the run directory that holds its event files.
    project = TENSORBOARD_DIR if cfg.report_to == "tensorboard" else PROJECT
    init_kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir)}, "mlflow": {"run_name": run_dir.name}}
    accelerator.init_trackers(project, config=hyperparameters(cfg),
                              init_kwargs={cfg.report_to: init_kwargs.get(cfg.report_to, {})})
