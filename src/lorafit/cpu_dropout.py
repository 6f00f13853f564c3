"""Dropout on the CPU, cheaper than PyTorch's: other masks (``fast_dropout``), or PyTorch's own
with less work (``vectorised_masks``).

On the CPU, ``F.dropout`` draws its mask with ``bernoulli_``: two 32-bit Mersenne-Twister
numbers per element on one thread, about a third of a 2-thread training step of the embedded
model (docs/performance.md). Two ways out:

* :func:`use_fast_dropout` (``TrainConfig.fast_dropout``): one 64-bit draw of a NumPy SFC64 stream
  decides four elements. It puts :class:`FastDropout` in place of every ``nn.Dropout`` of a model,
  LoRA's included, and gives BERT-style models :func:`fast_attention`, whose probabilities'
  dropout is drawn the same way. Its masks differ from ``nn.Dropout``'s (so a run is not PEFT's
  bit for bit), which is why the option is off by default.
* :func:`use_vectorised_dropout` (``TrainConfig.vectorised_masks``, the default): PyTorch's own
  masks from :mod:`lorafit.mt_masks`' vectorised kernel, written straight as dropout's scaled
  noise (:class:`VectorisedDropout`), and SDPA's math path without its masked-row checks
  (:func:`vectorised_attention`). Every output and gradient is PyTorch's, bit for bit.

Evaluation, p = 0 and GPUs are untouched by either.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorafit import mt_masks


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
    return _swap_dropouts(model, FastDropout, FAST_ATTENTION, fast_attention)


def _swap_dropouts(model: nn.Module, dropout: type[nn.Dropout], attention_name: str, attention: Any) -> int:
    """Every ``nn.Dropout`` of ``model`` becomes a ``dropout`` of the same ``p``, and SDPA attention
    run through Transformers' attention interface becomes ``attention`` (unless None)."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, dropout(child.p).train(child.training))
    config = getattr(model, "config", None)
    if (attention is not None and getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(model, "_supports_attention_backend", False)):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(attention_name, attention)
        AttentionMaskInterface.register(attention_name, sdpa_mask)  # the same masks SDPA is given
        model.set_attn_implementation(attention_name)
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


# The last boolean attention mask seen, its version (bumped by any change in place) and its
# additive form. Transformers builds one mask a forward pass and hands the same tensor to every
# layer, so it is converted once, not per layer.
_last_mask: list[Any] = []


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
    return _cached(_last_mask, mask, lambda m: torch.zeros(m.shape, dtype=torch.float32, device=m.device)
                   .masked_fill_(m.logical_not(), torch.finfo(torch.float32).min))


def _cached(cache: list[Any], mask: torch.Tensor, convert: Callable[[torch.Tensor], Any]) -> Any:
    """``convert(mask)``, computed again only for another tensor or for this one changed in place
    since (its version counter moved); every time for an inference tensor, which has no counter."""
    version = None if mask.is_inference() else mask._version
    if version is None or not cache or cache[0] is not mask or cache[1] != version:
        cache[:] = [mask, version, convert(mask)]
    return cache[2]


class VectorisedDropout(nn.Dropout):
    """``nn.Dropout`` with PyTorch's own masks written straight as the scaled noise
    (:func:`lorafit.mt_masks.dropout`): the same output and gradient, one pass cheaper. It is
    ``nn.Dropout`` itself outside a :func:`lorafit.mt_masks.drawn_vectorised` block, in eval mode,
    in place, and on a GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace:
            return super().forward(x)
        return mt_masks.dropout(x, self.p)


def use_vectorised_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` in ``model`` (LoRA's too) with a :class:`VectorisedDropout` of
    the same ``p``, and SDPA attention with :func:`vectorised_attention`; returns how many dropouts
    were replaced. Nothing any of them computes changes, so this is what the defaults run.

    The attention stays SDPA's where :func:`vectorised_attention` would not reproduce it here (a
    PyTorch whose math path computes otherwise), with a warning.
    """
    if not _agrees_with_sdpa():
        warnings.warn("lorafit: the training attention does not reproduce this PyTorch's SDPA; SDPA stays",
                      stacklevel=2)
        return _swap_dropouts(model, VectorisedDropout, "sdpa", None)  # the masks alone
    return _swap_dropouts(model, VectorisedDropout, VECTORISED_ATTENTION, vectorised_attention)


VECTORISED_ATTENTION = "lorafit_vectorised_masks"  # not saved in config.json either


def vectorised_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention; in CPU training with dropout, SDPA's own math path, the same
    bits with less work.

    With dropout in training, PyTorch's CPU SDPA runs its math path: queries, keys and values
    upcast to fp32, each of queries and keys scaled by the root of the scale, the two products,
    the mask added, softmax, dropout, and the output cast back. This is that sequence, op for op,
    so autograd records the same backward, with two differences that change no bit: the softmax
    skips SDPA's check of every row for full masking (``_safe_softmax``: ``isneginf``, ``all``
    and ``where`` over the scores, 4% of an MRPC step), which is only needed where a query sees
    no key at all, and such a mask is handed to SDPA itself; and the probabilities' dropout
    writes its scaled noise at once (:func:`lorafit.mt_masks.dropout`). 3.2 against 4.0 ms a
    layer forward and backward for MRPC's 16 x 12 x 53 x 53 (bf16, 2 threads). Everything else
    (evaluation, p = 0, a GPU, float masks, causal or grouped attention) is SDPA's attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = _checked_mask(attention_mask) if _math_path_applies(module, query, dropout, scaling, kwargs) else False
    if mask is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = _math_attention(query, key, value, mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def _math_path_applies(module: nn.Module, query: torch.Tensor, dropout: float, scaling: float | None,
                       kwargs: dict[str, Any]) -> bool:
    """Whether :func:`vectorised_attention` computes this call itself (else it is SDPA's): CPU
    training with dropout, non-negative scaling, no causal, grouped, biased or capped attention."""
    return (module.training and dropout > 0 and query.device.type == "cpu"
            and (scaling is None or scaling >= 0) and not getattr(module, "is_causal", False)
            and getattr(module, "num_key_value_groups", 1) == 1
            and all(kwargs.get(k) is None for k in ("is_causal", "position_bias", "softcap")))


def _math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    dropout: float, scaling: float | None, rows_drawn: int | None = None) -> torch.Tensor:
    """PyTorch's ``_scaled_dot_product_attention_math``, op for op, with a plain softmax.

    ``rows_drawn``: ``query`` holds the first of that many query rows (:mod:`lorafit.head_row`),
    and the probabilities' dropout draws the mask of all of them, keeping the first row's, so that
    the random stream is the one the whole attention would leave.
    """
    dtype = query.dtype
    if torch.is_autocast_enabled("cpu"):  # SDPA is one of autocast's lower-precision ops
        dtype = torch.get_autocast_dtype("cpu")
    # As SDPA's kernel, which runs below autocast: nothing inside is cast again.
    with torch.autocast("cpu", enabled=False):
        q, k, v = (t.to(dtype) for t in (query, key, value))
        if dtype in (torch.bfloat16, torch.float16):  # the math path computes in fp32
            q, k, v = q.float(), k.float(), v.float()
        root = math.sqrt(1.0 / math.sqrt(query.size(-1)) if scaling is None else scaling)
        scores = torch.matmul(q * root, k.transpose(-2, -1) * root)
        if mask is not None:
            scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        if rows_drawn is None:
            probs = mt_masks.dropout(probs, dropout)
        else:  # dropout's noise is x * noise for x = 1: the mask itself, then the first row's part
            whole = probs.new_ones(*probs.shape[:-2], rows_drawn, probs.size(-1))
            probs = probs * mt_masks.dropout(whole, dropout)[..., : probs.size(-2), :]
        return torch.matmul(probs, v).to(dtype)


# The last boolean mask seen, its version and its SDPA form: Transformers builds one mask a forward
# pass and hands the same tensor to every layer, so it is checked and converted once, not per layer.
_last_exact: list[Any] = []


def _checked_mask(mask: torch.Tensor | None) -> torch.Tensor | None | bool:
    """``mask`` as SDPA adds it to the scores (0 where a key is attended, -inf where not); False
    where :func:`_math_attention` would not reproduce SDPA: a float mask, or a query row that
    attends to no key (SDPA's softmax gives it zeros, a plain softmax NaN)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        return False
    return _cached(_last_exact, mask, _added_by_sdpa)


def _added_by_sdpa(mask: torch.Tensor) -> torch.Tensor | bool:
    if not bool(mask.any(dim=-1).all()):
        return False
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask.logical_not(), -math.inf)


def _agrees_with_sdpa() -> bool:
    """Whether :func:`_math_attention` gives SDPA's output and gradients here, bit for bit:
    checked once a process (a few milliseconds), in bf16 autocast and fp32, with padding and
    dropout. The default generator is left as it was found."""
    if _agreement:
        return _agreement[0]
    rng = torch.get_rng_state()
    try:
        generator = torch.Generator().manual_seed(0)
        lengths = torch.tensor([7, 3])
        mask = (torch.arange(7)[None, :] < lengths[:, None])[:, None, None, :].expand(2, 1, 7, 7)
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25, scale=0.3)
        ours = lambda q, k, v: _math_attention(q, k, v, _checked_mask(mask), 0.25, 0.3)
        agrees = True
        for dtype, autocast in ((torch.bfloat16, True), (torch.float32, False)):
            qkv = [torch.randn(2, 3, 7, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3)]
            grad = torch.randn(2, 3, 7, 8, generator=generator).to(dtype)
            results = []
            for attention in (sdpa, ours):
                torch.default_generator.manual_seed(5)  # the CPU's alone: a GPU's stream is not touched
                with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = attention(*qkv)
                results.append((out, *torch.autograd.grad(out, qkv, grad)))
            agrees = agrees and all(torch.equal(a, b) for a, b in zip(*results))
    finally:
        torch.set_rng_state(rng)
    _agreement.append(agrees)
    return agrees


_agreement: list[bool] = []
