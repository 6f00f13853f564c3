"""In training, the last encoder layer computes past its attention only the row the head reads.

The sequence-classification heads of BERT, RoBERTa, ELECTRA and DeBERTa-v2 read the last
layer's first token ([CLS], ``<s>``) and nothing else. That layer's attention needs every token
(the first token's query looks at all of them), but what follows it works row by row: the
attention's output projection and LayerNorm, the feed-forward block and its LayerNorm. Every
other row of those is computed only to be thrown away, and its gradient is zero. Skipping them
takes 9 of the 12 hidden x hidden products a token costs in that layer, forward and backward: for
the embedded model's 6 layers, an eighth of a training step's matrix work.

Where the attention is lorafit's own CPU training attention (:func:`lorafit.cpu_dropout.vectorised_attention`,
BERT, RoBERTa and ELECTRA by default), the attention itself computes only the first token's query
too: its keys and values are every token's, but its query projection, scores, softmax and
weighted sum one row of each. That takes 10 of the 12 products a token costs in the layer.

Nothing the loss depends on changes: the first row is computed by the same operations from the
same inputs. Dropout draws the same masks as the full layer would (each dropout of the first row
draws a mask for the whole sequence and keeps the first row's), so a run keeps its random stream;
only the matrix products' rounding may differ in the last bits, as it may between thread counts.
Evaluation (eval mode) runs the full layer, so logits are Transformers' own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorafit import cpu_dropout

# Model types whose sequence-classification head reads only the first token of the last layer,
# and whose layers run attention.self, then attention.output(context, residual), intermediate and
# output, each row by row after the attention.
HEAD_READS_FIRST_TOKEN = ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2")


class _Pass:
    """The sequence length of the training pass now inside the last layer (None outside one), and
    whether the attention has asked with the first token's query alone."""

    length: int | None = None
    asked_first_query: bool = False


class FirstRow:
    """What :func:`first_row_only` installed, and how much of the last layer it has cut so far."""

    def __init__(self, state: _Pass) -> None:
        self._state = state

    @property
    def extent(self) -> str:
        """``"query"`` once the attention has asked with the first token's query alone (lorafit's CPU
        attention), else ``"past_attention"`` (only what follows the attention is cut)."""
        return "query" if self._state.asked_first_query else "past_attention"


def last_layer(model: nn.Module) -> nn.Module | None:
    """The encoder layer whose first row the head reads, where :func:`first_row_only` can cut it."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in HEAD_READS_FIRST_TOKEN:
        return None
    if getattr(config, "chunk_size_feed_forward", 0) or getattr(config, "is_decoder", False):
        return None
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:  # DeBERTa's first layer feeds a conv
        return None
    last = layers[-1]
    parts = (getattr(getattr(last, "attention", None), "output", None), getattr(last, "intermediate", None),
             getattr(last, "output", None))
    return last if all(part is not None for part in parts) else None


def first_row_only(model: nn.Module, same_masks: bool = True) -> FirstRow | None:
    """Make ``model``'s last encoder layer compute, in training, only the first row past its attention.

    Args:
        model: A sequence-classification model of a type in ``HEAD_READS_FIRST_TOKEN``, after
            any swap of its dropout modules (:mod:`lorafit.cpu_dropout`): the masks are hooked here.
        same_masks: Dropout past the attention draws the whole sequence's mask, as the full layer
            does, so the random stream does not change. False under ``torch.compile``, whose
            kernels draw their own masks anyway.

    Returns:
        What was installed (its ``extent`` says how much has been cut), or None where nothing
        was: other model types, a one-layer encoder, a feed-forward chunked over the sequence.
    """
    last = last_layer(model)
    if last is None:
        return None
    after_attention = [last.attention.output, last.intermediate, last.output]
    state = _Pass()
    after_attention[0].register_forward_pre_hook(functools.partial(_first_rows, state))
    first_row_parts = after_attention
    attention = last.attention.self
    if same_masks and all(hasattr(attention, name) for name in _SELF_ATTENTION):  # BERT's layout
        attention.forward = functools.partial(_first_query, state, attention, attention.forward)
        first_row_parts = [attention.query, *after_attention]
    if same_masks:
        last.register_forward_hook(functools.partial(_leave, state))
        for part in first_row_parts:
            for module in part.modules():
                if isinstance(module, nn.Dropout):
                    module.register_forward_pre_hook(functools.partial(_whole_sequence, state))
                    module.register_forward_hook(functools.partial(_first_row_of, state))
    return FirstRow(state)


# What BERT's self-attention holds (RoBERTa's and ELECTRA's are copies of it).
_SELF_ATTENTION = ("query", "key", "value", "attention_head_size", "scaling", "dropout", "config")


def _first_query(state: _Pass, module: nn.Module, forward: Callable[..., Any], hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    """The last layer's self-attention in training: the first token's query against every token.

    Only where the layer's attention is :func:`lorafit.cpu_dropout.vectorised_attention` and it
    would compute the call itself (CPU training with dropout): this is that computation for one
    query row, with the masks of all rows drawn. Anything else runs the module's own ``forward``.
    """
    length = hidden_states.size(1) if hidden_states.dim() == 3 else 0
    dropout = module.dropout.p if module.training else 0.0
    ours = (length > 1 and not args and all(v is None for v in kwargs.values())
            and getattr(module.config, "_attn_implementation", None) == cpu_dropout.VECTORISED_ATTENTION
            and cpu_dropout._math_path_applies(module, hidden_states, dropout, module.scaling, kwargs))
    mask = cpu_dropout._checked_mask(attention_mask) if ours else False
    if mask is False:
        return forward(hidden_states, attention_mask, *args, **kwargs)
    batch, size = hidden_states.size(0), module.attention_head_size
    state.asked_first_query = True
    state.length = length  # the query's LoRA dropout draws the whole sequence's mask
    query = module.query(hidden_states[:, :1]).view(batch, 1, -1, size).transpose(1, 2)
    state.length = None
    key = module.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    value = module.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    if mask is not None and mask.size(-2) == length:  # a mask per query row: the first row's
        mask = mask[..., :1, :]
    out = cpu_dropout._math_attention(query, key, value, mask, dropout, module.scaling, rows_drawn=length)
    return out.transpose(1, 2).reshape(batch, 1, -1).contiguous(), None


def _first_rows(state: _Pass, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Before ``attention.output(context, residual)``: the first row of both, in training (the
    context may hold it alone already, from :func:`_first_query`)."""
    state.length = None
    if not module.training or len(args) < 2:
        return None
    context, residual = args[0], args[1]
    if context.dim() != 3 or residual.dim() != 3 or residual.size(1) <= 1 or context.size(1) not in (1, residual.size(1)):
        return None
    state.length = residual.size(1)
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
