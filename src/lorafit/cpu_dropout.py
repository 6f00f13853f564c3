"""Dropout whose CPU masks cost a fraction of PyTorch's (``TrainConfig.fast_dropout``).

On the CPU, ``F.dropout`` draws its mask with ``bernoulli_``: two 32-bit Mersenne-Twister
numbers per element on one thread, about a third of a 2-thread training step of the embedded
model (docs/performance.md). Here one 64-bit draw of a NumPy SFC64 stream decides four elements.
:func:`use_fast_dropout` puts :class:`FastDropout` in place of every ``nn.Dropout`` of a model,
LoRA's included, and gives BERT-style models :func:`fast_attention`, whose probabilities' dropout
is drawn the same way. Its masks differ from ``nn.Dropout``'s (so a run is not PEFT's bit for
bit), which is why the option is off by default. Evaluation, p = 0 and GPUs are untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of a CPU tensor, its mask from 16-bit random integers.

    One int64 drawn from torch's default generator (the one resume checkpoints save) seeds a
    NumPy SFC64 stream; each 16-bit word of it, uniform on [-32768, 32767], decides one element
    against one threshold, so the drop probability is ``p`` rounded to a multiple of 1/65536
    (0.1 becomes 0.100006). Kept values are scaled by the inverse of the actual keep
    probability, so the output is unbiased as ``F.dropout``'s is.

    Why not torch alone: on the 2-core machines here, for attention probabilities of 16 x 12 x
    53 x 53, ``random_()`` takes 390 us where SFC64 fills the same words in 195 us, and
    multiplying by a bool mask takes 320 us where the same mask viewed as uint8 takes 130 us
    (bool operands leave PyTorch's vectorised CPU kernels). Seeding costs about 6 us a call. The
    words are compared with the threshold in NumPy: 12 us for an 848 x 384 activation, where
    PyTorch's ``>=`` on int16 takes 71 us on 2 threads; the mask is the same.
    """
    if p >= 1.0:
        return x * 0.0
    drop = round(p * 65536)  # of 65536
    seed = int(torch.empty((), dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4).view(np.int16)[: x.numel()]
    keep = torch.from_numpy(np.greater_equal(words, drop - 32768)).view(x.shape)
    return (x * keep.view(torch.uint8)).mul_(65536 / (65536 - drop))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks cost a fraction of ``F.dropout``'s (:func:`fast_dropout`).

    PyTorch draws a CPU dropout mask one Mersenne-Twister number per element on one thread:
    2-3 ms for an 848 x 384 activation on the 2-core machines here, against 0.67 ms for the
    384 x 384 projection of it (docs/performance.md). One 64-bit draw decides four elements here.
    Elsewhere (a GPU: Philox is fast there), in eval mode and at p = 0 it is ``nn.Dropout``. A
    model's attention-probability dropout is drawn inside SDPA, which only reads ``.p``: that
    one is :func:`fast_attention`'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` in ``model`` (LoRA's too) with a :class:`FastDropout` of the
    same ``p``, and SDPA attention with :func:`fast_attention`; returns how many dropouts were
    replaced.

    The attention is switched only where the model runs Transformers' SDPA attention through its
    attention interface (BERT, RoBERTa); DeBERTa computes its own attention, whose dropout is an
    ``nn.Dropout`` module and so swapped with the rest.
    """
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, FastDropout(child.p).train(child.training))
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and getattr(model, "_supports_attention_backend", False):
        _register_fast_attention()
        model.set_attn_implementation(FAST_ATTENTION)
    return len(swaps)


# The name lorafit's attention is registered under with Transformers. Transformers does not save
# it in config.json, so a saved or merged model loads with its own default attention elsewhere.
FAST_ATTENTION = "lorafit_fast_dropout"


def fast_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, with the probabilities' dropout drawn by :func:`fast_dropout`.

    In training on the CPU with dropout, PyTorch's SDPA takes its math path: it upcasts bf16
    queries, keys and values to fp32, multiplies in fp32, checks every row for full masking, and
    draws a ``bernoulli_`` mask of batch x heads x length x length, larger than any other
    activation of an encoder layer. Here the two products run in autocast's dtype (as
    Transformers' eager attention computes them), the scores, softmax and dropout in fp32. Masked
    keys get float32's minimum rather than -inf, so a fully masked row gives uniform weights, as
    eager attention does, not NaN. Everywhere else (evaluation, p = 0, a GPU) it is Transformers'
    SDPA attention itself, so evaluation logits do not change.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (module.training and dropout > 0 and query.device.type == "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)).float()
    scores.mul_(query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores.add_(_additive_mask(attention_mask))
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


# The last boolean attention mask seen and its additive form. Transformers builds one mask a
# forward pass and hands the same tensor to every layer, so it is converted once, not per layer.
_last_mask: list[torch.Tensor] = []


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a float32 addend: 0 where a key is attended, float32's minimum where it is not.

    Added to fp32 scores, the minimum absorbs any score, so the sum equals what ``masked_fill``
    writes, bit for bit, and so do the gradients wherever a query row attends to some key (the
    softmax's gradient is 0 at masked keys); a row with no key at all, which key padding never
    makes, passes the uniform weights' gradient on, as Transformers' eager attention does. But an
    add costs about half a ``masked_fill`` of a mask broadcast over the heads, and its backward
    nothing, where ``masked_fill``'s is a second ``masked_fill``: 3.46 against 3.90 ms a layer
    forward and backward for MRPC's 16 x 12 x 53 x 53 scores (2 threads, tcmalloc).
    """
    if mask.dtype != torch.bool:
        return mask
    if not _last_mask or _last_mask[0] is not mask:
        addend = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        _last_mask[:] = [mask, addend.masked_fill_(mask.logical_not(), torch.finfo(torch.float32).min)]
    return _last_mask[1]


def _register_fast_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_ATTENTION, fast_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)  # the same masks SDPA is given
