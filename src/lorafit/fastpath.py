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
* ``fast_dropout``, ``vectorised_masks`` and ``reuse_memory`` live with what they change:
  :mod:`lorafit.cpu_dropout` (cheaper masks from another stream), :mod:`lorafit.mt_masks`
  (PyTorch's own masks, drawn faster) and :func:`lorafit.allocator.reuse_freed_memory` (malloc).
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorafit.errors import LorafitError, LorafitWarning

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
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware, so that bf16 pays off.

    On a CPU that means AMX or AVX-512 BF16. One without either (an AVX2-only EPYC, most laptops)
    runs PyTorch's bf16 matrix products 60-120x slower than fp32, whole training runs 30x slower
    and evaluation 3x (docs/performance.md, "A CPU without bf16").
    """
    if device.type == "cuda":  # compute capability 8 (Ampere) and up; older ones only emulate bf16
        return torch.cuda.is_bf16_supported(including_emulation=False)
    from lorafit.bench.env import cpu_has_bf16_matmul

    return cpu_has_bf16_matmul()


def emulated_bf16(device: torch.device) -> str | None:
    """Why bf16 would be slow on ``device``, which only emulates it; None where bf16 is native."""
    if native_bf16(device):
        return None
    where = "this GPU" if device.type == "cuda" else "this CPU (it has neither AMX nor AVX-512 BF16)"
    return (f"bf16 on {where} is emulated, many times slower than fp32 (training 30x, evaluation 3x on an "
            "AVX2-only EPYC)")


def warn_if_slow_bf16(precision: str, device: torch.device, why: str) -> None:
    """A :class:`LorafitWarning` when ``precision`` is bf16 on a device that only emulates it.

    ``why`` names what asked for bf16 (a flag, a resumed run), so the user knows what to change.
    """
    if precision == "bf16" and (slow := emulated_bf16(device)):
        warnings.warn(f"{why}: {slow}; --precision fp32 or auto avoids that", LorafitWarning, stacklevel=2)


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
    return 2 if mode in ("reduce-overhead", "step-graph") else 1


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device``; on a GPU from pinned memory and without blocking the host."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
