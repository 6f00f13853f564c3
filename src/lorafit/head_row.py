"""In training, the last encoder layer computes past its attention only the row the head reads.

The sequence-classification heads of BERT, RoBERTa, ELECTRA and DeBERTa-v2 read the last
layer's first token ([CLS], ``<s>``) and nothing else. That layer's attention needs every token
(the first token's query looks at all of them), but what follows it works row by row: the
attention's output projection and LayerNorm, the feed-forward block and its LayerNorm. Every
other row of those is computed only to be thrown away, and its gradient is zero. Skipping them
takes 9 of the 12 hidden x hidden products a token costs in that layer, forward and backward: for
the embedded model's 6 layers, an eighth of a training step's matrix work.

Nothing the loss depends on changes: the first row is computed by the same operations from the
same inputs. Dropout draws the same masks as the full layer would (each dropout past the attention
draws a mask for the whole sequence and keeps the first row's), so a run keeps its random stream;
only the matrix products' rounding may differ in the last bits, as it may between thread counts.
Evaluation (eval mode) runs the full layer, so logits are Transformers' own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

# Model types whose sequence-classification head reads only the first token of the last layer,
# and whose layers run attention.self, then attention.output(context, residual), intermediate and
# output, each row by row after the attention.
HEAD_READS_FIRST_TOKEN = ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2")


class _Pass:
    """The sequence length of the training pass now inside the last layer (None outside one)."""

    length: int | None = None


def first_row_only(model: nn.Module, same_masks: bool = True) -> bool:
    """Make ``model``'s last encoder layer compute, in training, only the first row past its attention.

    Args:
        model: A sequence-classification model of a type in ``HEAD_READS_FIRST_TOKEN``, after
            any swap of its dropout modules (:mod:`lorafit.cpu_dropout`): the masks are hooked here.
        same_masks: Dropout past the attention draws the whole sequence's mask, as the full layer
            does, so the random stream does not change. False under ``torch.compile``, whose
            kernels draw their own masks anyway.

    Returns:
        Whether it was installed: not for other model types, a one-layer encoder, or a model
        that chunks its feed-forward block over the sequence.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in HEAD_READS_FIRST_TOKEN:
        return False
    if getattr(config, "chunk_size_feed_forward", 0) or getattr(config, "is_decoder", False):
        return False
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:  # DeBERTa's first layer feeds a conv
        return False
    last = layers[-1]
    after_attention = [getattr(getattr(last, "attention", None), "output", None),
                       getattr(last, "intermediate", None), getattr(last, "output", None)]
    if any(part is None for part in after_attention):
        return False
    state = _Pass()
    after_attention[0].register_forward_pre_hook(functools.partial(_first_rows, state))
    if same_masks:
        last.register_forward_hook(functools.partial(_leave, state))
        for part in after_attention:
            for module in part.modules():
                if isinstance(module, nn.Dropout):
                    module.register_forward_pre_hook(functools.partial(_whole_sequence, state))
                    module.register_forward_hook(functools.partial(_first_row_of, state))
    return True


def _first_rows(state: _Pass, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Before ``attention.output(context, residual)``: the first row of both, in training."""
    state.length = None
    if not module.training or len(args) < 2:
        return None
    context, residual = args[0], args[1]
    if context.dim() != 3 or context.size(1) <= 1 or residual.shape != context.shape:
        return None
    state.length = context.size(1)
    return (context[:, :1], residual[:, :1], *args[2:])


def _whole_sequence(state: _Pass, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Before a dropout past the attention: its one row repeated over the sequence, so that the mask
    drawn is the full layer's (the same numbers in the same order)."""
    if state.length is None or not module.training:
        return None
    x = args[0]
    return (x.expand(x.size(0), state.length, *x.shape[2:]).contiguous(), *args[1:])


def _first_row_of(state: _Pass, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    if state.length is None or not module.training:
        return None
    return output[:, :1]


def _leave(state: _Pass, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    state.length = None
