"""Where a training run stands (saved in every checkpoint), and the summary it ends with."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorafit import __version__
from lorafit.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from lorafit.data import TaskSpec
    from lorafit.lora import ParameterCount


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already trained on
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_epoch: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None

    def advance(self, group: list[np.ndarray], lengths: np.ndarray, epoch_done: bool) -> None:
        """Count one optimizer step over ``group`` (its micro-batches of example indices)."""
        self.step += 1
        self.examples += sum(len(g) for g in group)
        self.tokens += int(sum(lengths[g].sum() for g in group))
        self.batch_in_epoch += len(group)
        if epoch_done:  # before any checkpoint of this step, which must point at the next epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def build_summary(cfg: TrainConfig, task: TaskSpec, counts: ParameterCount, progress: Progress,
                  device: torch.device, num_processes: int = 1) -> dict[str, Any]:
    """The contents of ``summary.json`` for a finished run (trained by ``num_processes`` processes)."""
    from lorafit.hardware import hardware_info, peak_memory_gib
    from lorafit.models import display_name

    seconds = max(progress.train_seconds, 1e-9)
    return {
        "status": "finished",
        "task": task.name,
        "model": display_name(cfg.model),
        "method": cfg.method,
        "rank": cfg.rank if cfg.method == "lora" else None,
        "target_modules": cfg.target_modules,
        "seed": cfg.seed,
        "learning_rate": cfg.learning_rate,
        "metric": task.metric,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "best_step": progress.best_step,
        "best_metrics": progress.best_metrics,
        "steps": progress.step,
        "num_processes": num_processes,
        "global_batch_size": cfg.batch_size * num_processes * cfg.grad_accum,
        "epochs": progress.epoch + (progress.batch_in_epoch > 0),
        "trainable_parameters": {"adapter": counts.adapter, "head": counts.head,
                                 "trainable": counts.trainable, "total": counts.total},
        "train_seconds": round(progress.train_seconds, 2),
        "examples": progress.examples,
        "tokens": progress.tokens,
        "examples_per_second": round(progress.examples / seconds, 2),
        "tokens_per_second": round(progress.tokens / seconds, 1),
        "peak_memory_gib": round(peak_memory_gib(device), 3),
        "hardware": hardware_info(device),
        "precision": cfg.precision,
        "command": "lorafit " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "lorafit" else None,
        "lorafit_version": __version__,
    }
