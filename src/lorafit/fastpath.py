"""The fast training path's choices: precision, frozen weights in bf16, length buckets, compile.

Each is a ``TrainConfig`` field, so ``lorafit bench`` can switch it and measure it. Why each helps:

* ``precision="auto"`` picks bf16 where the hardware multiplies bf16 natively (AMX or AVX-512
  BF16 on a CPU, a bf16-capable GPU) and fp32 elsewhere.
* ``frozen_bf16``: under autocast every frozen fp32 weight is cast to bf16 again at every step
  (autocast caches casts only for weights that require grad). Storing the frozen base in bf16
  once gives the same products (the cast is the same rounding) without that traffic; LoRA
  factors and the head stay fp32 for the optimizer.
* ``length_buckets``: padding each batch up to one of a few lengths bounds the number of
  shapes, so a compiled model (or CUDA graphs) is built a few times, not once per length.
* ``compile``: ``torch.compile`` of the model's forward and backward (inductor); on a GPU
  ``reduce-overhead`` mode replays CUDA graphs, removing per-kernel launch cost.
* ``fast_dropout``: on the CPU, dropout masks from 16-bit random integers (:class:`FastDropout`)
  instead of ``bernoulli_``, which on these machines is a third of a 2-thread training step; the
  attention probabilities get theirs through :func:`fast_attention`.
* ``reuse_memory``: glibc's malloc keeps freed activations for the next step instead of giving
  them back to the kernel (:func:`reuse_freed_memory`).
"""

from __future__ import annotations

import collections
import ctypes
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.progress import Progress

# Lengths a batch is padded up to when compiling: few shapes, little padding for GLUE's lengths.
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise LorafitError("--device cuda: no CUDA device is available (use --device cpu)")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_precision(precision: str, device: torch.device, recorded: str | None = None) -> str:
    """``auto`` becomes bf16 where the hardware multiplies bf16 natively, else fp32.

    Args:
        precision: The configured precision (``auto``, ``fp32``, ``bf16`` or ``fp16``).
        device: Where the run trains.
        recorded: The precision a resumed run's config.yaml records: ``auto`` continues in it,
            so a run started in fp32 (the default before ``auto``) is not resumed in bf16.
    """
    if precision != "auto":
        return precision
    if recorded is not None and recorded != "auto":
        return recorded
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from lorafit.bench.env import cpu_has_bf16_matmul

    return "bf16" if cpu_has_bf16_matmul() else "fp32"


def resolve_frozen_bf16(frozen_bf16: bool | None, precision: str, method: str) -> bool:
    """Whether to store the frozen base in bf16: by default whenever LoRA trains in bf16."""
    if frozen_bf16 is None:
        return precision == "bf16" and method == "lora"
    if frozen_bf16 and (precision != "bf16" or method != "lora"):
        raise LorafitError("--frozen-bf16 stores the frozen base of a LoRA model in bf16: it needs "
                           f"--method lora and --precision bf16 (or auto on bf16 hardware), got {method}, {precision}")
    return frozen_bf16


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast every frozen ``nn.Linear`` (no trainable parameter) to ``dtype``; returns how many.

    Embeddings and LayerNorms stay fp32 (autocast keeps normalisation in fp32 anyway); LoRA
    factors and the head are trainable and stay fp32, so the optimizer updates full-precision
    values.
    """
    count = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear) and params and not any(p.requires_grad for p in params):
            module.to(dtype)
            count += 1
    return count


def bucket_lengths(buckets: Sequence[int] | None, max_length: int, compile: bool) -> tuple[int, ...] | None:
    """The padding lengths to use: the user's, the defaults when compiling, or None (pad to longest)."""
    if buckets:
        return tuple(sorted(set(buckets)))
    if compile:
        return tuple(sorted({b for b in DEFAULT_BUCKETS if b < max_length} | {max_length}))
    return None


def padded_width(width: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket that holds ``width`` tokens (``width`` itself beyond the largest)."""
    if not buckets:
        return width
    return next((b for b in buckets if b >= width), width)


def compile_mode(mode: str, device: torch.device) -> str:
    """``auto``: CUDA graphs (``reduce-overhead``) on a GPU, inductor's default on a CPU."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_warmup_steps(mode: str) -> int:
    """Steps of each new shape before the compiled step runs at its steady speed (see ShapeTimer)."""
    return 2 if mode == "reduce-overhead" else 1


def compile_model(model: nn.Module, mode: str, num_shapes: int) -> nn.Module:
    """``torch.compile`` with static shapes, allowed to specialise once per bucketed shape."""
    import torch._dynamo

    limit = max(8, num_shapes + 4)
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    return torch.compile(model, mode=mode, dynamic=False)


def adamw_kwargs(fused: bool, params: list[torch.Tensor]) -> dict[str, Any]:
    """One fused AdamW kernel for all parameters where torch has it (CPU and CUDA, float params)."""
    devices = {p.device.type for p in params}
    if fused and devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in params):
        return {"fused": True}
    return {"foreach": True} if fused else {"foreach": False}


class ShapeTimer:
    """Time spent on steps that met a new batch shape: with ``--compile``, mostly compilation.

    The first ``warmup_steps`` steps of each shape are counted apart: the first compiles, and with
    CUDA graphs (``reduce-overhead``) the second records the graph, which only the third replays.
    The steps after them give the run's steady speed (``steady_speed``).
    """

    def __init__(self, device: torch.device, enabled: bool, warmup_steps: int = 1) -> None:
        self.device, self.enabled, self.warmup_steps = device, enabled, warmup_steps
        self.seen: collections.Counter[Any] = collections.Counter()
        self.seconds = 0.0
        self.steps = self.examples = self.tokens = 0
        self._start: tuple[float, int, int] | None = None

    def start(self, shape: Any, progress: Progress) -> None:
        if self.enabled and self.seen[shape] < self.warmup_steps:
            self.seen[shape] += 1
            if self.device.type == "cuda":  # the host must not run ahead of the timed step
                torch.cuda.synchronize(self.device)
            self._start = (time.perf_counter(), progress.examples, progress.tokens)

    def stop(self, progress: Progress) -> None:
        """After ``progress`` has counted the step."""
        if self._start is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            started, examples, tokens = self._start
            self.seconds += time.perf_counter() - started
            self.steps += 1
            self.examples += progress.examples - examples
            self.tokens += progress.tokens - tokens
            self._start = None

    def steady_speed(self, progress: Progress) -> dict[str, float]:
        """examples/s and tokens/s over the steps that compiled nothing (none: over all of them)."""
        seconds = progress.train_seconds - self.seconds
        if not self.steps or progress.examples == self.examples or seconds <= 0:
            return {}
        return {"examples_per_second": round((progress.examples - self.examples) / seconds, 2),
                "tokens_per_second": round((progress.tokens - self.tokens) / seconds, 1)}


# glibc's mallopt parameters (malloc.h) and its ceiling for the mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for later tensors; returns whether it did.

    By default glibc serves each block above a threshold (128 KiB, rising to the largest block
    freed so far) with its own ``mmap`` and gives the heap's free top back to the kernel past
    128 KiB. A training step allocates and frees the same activations every time, so each step
    faults them in again as fresh zeroed pages: on the 2-core machines here about 40,000 page
    faults a second of MRPC training, and 5-10% of a step (docs/performance.md). Blocks up to
    32 MiB (glibc's ceiling) now come from the heap and up to 1 GiB of free heap is kept, which is
    what jemalloc and tcmalloc, the allocators PyTorch's CPU tuning guide recommends preloading,
    do without a preload. The cost: the process's RSS stays near its peak between steps. Process
    wide and numerically neutral. Elsewhere than glibc on Linux (macOS, musl) it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, in the process already
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device``; on a GPU from pinned memory and without blocking the host."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


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
