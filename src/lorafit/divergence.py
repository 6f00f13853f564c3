"""Stopping a run whose loss or weights stop being finite, keeping what was saved before."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorafit import __version__
from lorafit.config import TrainConfig
from lorafit.errors import LorafitError
from lorafit.progress import Progress
from lorafit.run import RunDir


class DivergenceGuard:
    """Stops a run whose loss or weights stop being finite, keeping what was saved before.

    The loss flag is collected on the device (no host sync per step) and read at the moments
    that would otherwise evaluate or save NaN weights.
    """

    def __init__(self, params: list[nn.Parameter], device: torch.device) -> None:
        self.params = params
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=device)

    def watch(self, loss: torch.Tensor) -> None:
        self.bad_loss |= ~torch.isfinite(loss)

    def check(self, cfg: TrainConfig, run: RunDir, progress: Progress, accelerator: Any, weights: bool) -> None:
        what = "loss" if self.bad_loss.item() else None
        if (what is None and weights and self.params
                and not torch.stack([torch.isfinite(p).all() for p in self.params]).all().item()):  # one host sync
            what = "weights"
        if what is None:
            return
        message = (f"training diverged: the {what} became NaN or infinite by step {progress.step} "
                   f"(--learning-rate {cfg.learning_rate:g} is probably too high); the last good checkpoint and "
                   f"the best {'adapter' if cfg.method == 'lora' else 'model'} in {run.path} are kept")
        if accelerator.is_main_process:
            run.write_summary({"status": "diverged", "step": progress.step, "reason": message,
                               "best_metric": progress.best_metric,
                               "best_epoch": progress.best_epoch, "best_step": progress.best_step,
                               "best_metrics": progress.best_metrics, "lorafit_version": __version__})
        raise LorafitError(message)
