"""Evaluating a model on encoded dev sets: its outputs in file order, and the task's metrics.

Used by the training loop (every evaluation) and by ``lorafit eval`` (a trained model), so that
both compute the dev metric the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit.data import Encoded, TaskSpec, eval_batches
from lorafit.metrics import compute_metrics


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Encoded, batch_size: int, pad_id: int,
                   autocast: Callable[[], Any] = contextlib.nullcontext) -> np.ndarray:
    """Model outputs for every example of ``data``, in file order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    for indices, batch in eval_batches(data, batch_size, pad_id):
        batch.pop("labels")
        with autocast():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
        if out is None:
            out = np.zeros((len(data), logits.shape[-1]), dtype=np.float32)
        out[indices] = logits
    model.train(was_training)
    return out if out is not None else np.zeros((0, 1), dtype=np.float32)


def evaluate(model: nn.Module, evals: dict[str, Encoded], task: TaskSpec, batch_size: int, pad_id: int,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """The task's metrics over the dev split(s) in ``evals`` (split name -> encoded examples)."""
    outputs = {
        name: (predict_logits(model, data, batch_size, pad_id, autocast), data.labels)
        for name, data in evals.items()
    }
    return compute_metrics(task, outputs)
