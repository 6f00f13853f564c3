"""One training step built as ``lorafit train`` builds it, for the scripts that time or profile it.

``scripts/profile_step.py`` (where a step's time goes) and ``scripts/step_time.py`` (ms a step of
lorafit's settings side by side) both use it, so they measure the same step. ``step_time.py`` can
also time the step with one piece of the model taken out (:func:`remove_part`): torch.profiler
inflates the per-operator times of these small steps, the difference of two steps does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from lorafit import cpu_dropout, fastpath, head_row, mt_masks
from lorafit.data import batch_order
from lorafit.distributed import make_accelerator
from lorafit.setup import build_model, linear_schedule, make_optimizer
from lorafit.train import _accumulate


def typical_batches(cfg: Any, data: Any) -> tuple[list[np.ndarray], int]:
    """The first epoch's full batches of the median padded width, and that width: a typical step."""
    order = batch_order(len(data), cfg.batch_size, cfg.seed, 0, data.lengths, cfg.group_by_length)
    widths = np.array([data.lengths[b].max() for b in order])
    width = int(np.median(widths))
    return [b for b, w in zip(order, widths) if w == width and len(b) == cfg.batch_size], width


PARTS = ("attention", "gelu", "layernorm", "dropout")
_VALUES_ONLY = "lorafit_values_only"  # the attention function remove_part registers


def remove_part(model: nn.Module, part: str) -> int:
    """Take one piece out of every encoder layer of a BERT-style model, for timing only.

    ``attention``: each layer's attention returns its values unmixed (no products, softmax or
    dropout, and no gradient reaches the query and key projections); ``gelu``: the feed-forward
    activation becomes the identity; ``layernorm``: the encoder's LayerNorms do (the embeddings'
    stays); ``dropout``: every dropout, LoRA's and the attention probabilities' included, drops
    nothing (p = 0, so no mask is drawn). The model still trains, it just computes something else.
    Returns how many places changed.
    """
    if part not in PARTS:
        raise ValueError(f"part: expected one of {', '.join(PARTS)}, got {part!r}")
    changed = 0
    for name, module in model.named_modules():
        if part == "attention" and hasattr(module, "attention_head_size") and hasattr(module, "config"):
            module.config._attn_implementation = _VALUES_ONLY
            changed += 1
        elif part == "gelu" and hasattr(module, "intermediate_act_fn"):
            module.intermediate_act_fn = nn.Identity()
            changed += 1
        elif part == "dropout" and isinstance(module, nn.Dropout):
            module.p = 0.0
            changed += 1
        elif part == "layernorm" and "encoder" in name:
            for child_name, child in module.named_children():
                if isinstance(child, nn.LayerNorm):
                    setattr(module, child_name, nn.Identity())
                    changed += 1
    if part == "attention":
        from transformers import AttentionInterface

        AttentionInterface.register(_VALUES_ONLY, _values_only)
    return changed


def _values_only(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    return value.transpose(1, 2).contiguous(), None


def training_step(cfg: Any, task: Any, data: Any, vectorised_dropout: bool = True,
                  ) -> tuple[torch.nn.Module, Callable[[np.ndarray], torch.Tensor]]:
    """A model and one full step on it: forward and backward (``lorafit.train._accumulate``),
    clipping, optimizer, scheduler, ``zero_grad``, each named for the profiler.

    As ``lorafit train`` builds it: LoRA per ``cfg``, fast dropout if ``cfg.fast_dropout``, PyTorch's
    masks drawn vectorised if ``cfg.vectorised_masks`` (written as dropout's noise, and SDPA's math
    path without its checks, unless ``vectorised_dropout`` is False: the defaults before that came),
    the last layer past its attention on the first token only if ``cfg.cls_only_last_layer``, the
    frozen base in bf16 where LoRA trains in bf16, fused AdamW, autocast in ``cfg.precision``.
    """
    model = build_model(cfg, task)
    if cfg.fast_dropout:
        cpu_dropout.use_fast_dropout(model)
    elif cfg.vectorised_masks and vectorised_dropout:
        cpu_dropout.use_vectorised_dropout(model)
    if cfg.cls_only_last_layer:
        head_row.first_row_only(model)
    if fastpath.resolve_frozen_bf16(None, cfg.precision, "lora"):
        fastpath.cast_frozen_linears(model)
    optimizer = make_optimizer(model, cfg)
    scheduler = linear_schedule(optimizer, 10, 1000)
    accelerator = make_accelerator({"fp32": "no"}.get(cfg.precision, cfg.precision), torch.device("cpu"))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch: np.ndarray) -> torch.Tensor:
        with record_function("lorafit.forward_backward"), mt_masks.drawn_vectorised(cfg.vectorised_masks):
            loss = _accumulate(model, accelerator, data, [batch], 0)
        with record_function("lorafit.clip"):
            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        with record_function("lorafit.optimizer"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step
