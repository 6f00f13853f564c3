"""PyTorch's own CPU dropout masks, drawn 16 numbers at a time (``TrainConfig.vectorised_masks``).

On the CPU, ``F.dropout``, ``nn.Dropout`` and SDPA's dropout fill their masks with
``bernoulli_(1 - p)``. Per element, that kernel takes two 32-bit numbers of the generator's
Mersenne Twister (MT19937), forms a 53-bit uniform ``u`` from them, and keeps the element when
``u < 1 - p``. It draws the numbers one at a time on one thread: 1.8 ms for an 848 x 384 mask, about
a third of an MRPC training step of the embedded model (docs/performance.md).

The recurrence itself is not serial. MT19937 renews its 624 words of state in a pass whose
iterations depend only on words 1 and 397 places ahead, or 227 behind, so a compiler vectorises it.
:func:`drawn_vectorised` puts such a kernel in place of PyTorch's for ``aten::bernoulli_.float`` on
the CPU while a training loop runs. The kernel is compiled by Numba. It reads the generator's
state, fills the tensor in the order PyTorch's kernel visits it, and writes the advanced state
back. So the masks are PyTorch's bit for bit, and so are the stream after them, checkpoints and
resumes, and every trained weight. A run with it repeats PEFT's and lorafit's earlier runs exactly.
Numba rather than a C++ extension, because Numba ships as wheels: it needs no compiler where
lorafit is installed.

Before first use in a process, the kernel is checked against PyTorch's on a sample (masks and the
stream after them, fp32 and bf16). Where Numba is not installed, or that check fails (a PyTorch
whose generator differs), nothing is replaced and PyTorch's kernel runs: the same numbers, at
PyTorch's speed. Unlike ``fast_dropout`` (:mod:`lorafit.cpu_dropout`) this changes no result, so it
is on by default.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

N = 624  # MT19937's words of state
_STATE_BYTES = 5056  # a CPU generator's get_state(): CPUGeneratorImplState, as _bernoulli_ reads it
# lorafit.mt_kernels once imported and checked (_agrees_with_pytorch, which compiles the kernels:
# seconds the first time, then loaded from Numba's cache); False where it cannot be used.
_kernels: Any = None
_lock = threading.Lock()
# How many drawn_vectorised() blocks are open, and the one torch.library registration they share.
_open: dict[str, Any] = {"blocks": 0, "library": None}


def available() -> bool:
    """Whether the vectorised kernel runs here: Numba importable, and PyTorch's masks reproduced."""
    return _load() is not None


@contextlib.contextmanager
def drawn_vectorised(enabled: bool = True) -> Iterator[bool]:
    """Within the block, CPU ``bernoulli_(p)`` (every dropout mask) runs the vectorised kernel.

    Yields whether it does: False when ``enabled`` is False or Numba is missing. Blocks nest; the
    kernel is registered once and PyTorch's own comes back when the outermost block ends. The
    replacement is process-wide while it lasts, as any PyTorch kernel is: a ``bernoulli_`` on
    another thread gets it too, with the same numbers PyTorch's would give. Unlike PyTorch's, the
    kernel does not lock the generator while it draws, so two threads drawing from one generator
    at the same moment would not get PyTorch's numbers (a training loop draws from one thread).
    """
    if not enabled or _load() is None:
        yield False
        return
    with _lock:
        if _open["blocks"] == 0:
            library = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore")
                library.impl("bernoulli_.float", _bernoulli_, "CPU")
            _open["library"] = library
        _open["blocks"] += 1
    try:
        yield True
    finally:
        with _lock:
            _open["blocks"] -= 1
            if _open["blocks"] == 0:
                _open["library"]._destroy()
                _open["library"] = None


def active() -> bool:
    """Whether a :func:`drawn_vectorised` block is open: CPU masks come from the vectorised kernel."""
    return _open["blocks"] > 0


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)``, bit for bit, forward and backward, one pass cheaper.

    On the CPU, ``F.dropout`` fills a mask of 0 and 1 (``bernoulli_(1 - p)``), divides it by
    ``1 - p`` and multiplies ``x`` by it. Within a :func:`drawn_vectorised` block the kernel writes
    0 and the quotient ``1 / (1 - p)`` straight away, rounded as that division rounds it, and the
    multiply is the same ``x * noise``, so autograd keeps the same backward (``grad * noise``).
    That saves the division's pass over the mask: 0.44 against 0.53 ms forward and backward for
    a bf16 848 x 384 activation (2 threads). Elsewhere (no block open, a GPU, other dtypes, p of 0
    or 1) it is ``F.dropout`` itself.
    """
    value = _scaled_one(x.dtype, 1 - p) if active() and 0 < p < 1 and x.device.type == "cpu" else None
    if value is None or x.numel() == 0:
        return F.dropout(x, p, training=True)
    noise = torch.empty_like(x)  # the strides of x, as F.dropout's noise
    _fill(noise, 1 - p, None, value)
    return x * noise


def _scaled_one(dtype: torch.dtype, keep: float) -> Any:
    """The bits of ``1 / keep`` in ``dtype`` as PyTorch's ``div_(keep)`` of a mask rounds it (the
    value a kept element's noise holds in ``F.dropout``); None for dtypes the kernel does not write."""
    if dtype not in _ONE:
        return None
    key = (dtype, keep)
    if key not in _quotients:
        words, as_int, _ = _ONE[dtype]
        # Long enough for the division's vectorised loop and its tail: both must round alike.
        ones = torch.ones(67, dtype=dtype).div_(keep)
        _quotients[key] = words(ones[0].view(as_int).item()) if bool((ones == ones[0]).all()) else None
    return _quotients[key]


_quotients: dict[tuple[torch.dtype, float], Any] = {}
# The bit pattern of 1 in each float dtype, written straight into the tensor's memory.
_ONE = {torch.float32: (np.uint32, torch.int32, 0x3F80_0000), torch.bfloat16: (np.uint16, torch.int16, 0x3F80),
        torch.float16: (np.uint16, torch.int16, 0x3C00), torch.float64: (np.uint64, torch.int64, 0x3FF0_0000_0000_0000)}


def _bernoulli_(self: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``aten::bernoulli_.float`` on the CPU: PyTorch's numbers, from the vectorised kernel."""
    if not 0 <= p <= 1:  # PyTorch's own check and message
        raise RuntimeError(f"bernoulli_ expects p to be in [0, 1], but got p={p:g}")
    return _fill(self, p, generator, None)


def _fill(self: torch.Tensor, p: float, generator: torch.Generator | None, value: Any) -> torch.Tensor:
    """Fill ``self`` as ``bernoulli_(p)`` does, kept elements given ``value`` (bits of the dtype's
    word), or 1 when ``value`` is None."""
    n = self.numel()
    if n == 0:
        return self
    # PyTorch's kernel visits the elements in memory order: dimensions by decreasing stride.
    order = sorted(range(self.dim()), key=lambda d: -self.stride(d))
    target = self.detach().permute(order)
    # Other dtypes get a uint8 mask, cast into the tensor: 0 and 1 are exact in every dtype.
    float_bits = self.dtype in _ONE
    words, as_int, one = _ONE[self.dtype] if float_bits else (np.uint8, torch.uint8, 1)
    direct = float_bits and target.is_contiguous()
    out = target if direct else torch.empty(target.shape, dtype=self.dtype if float_bits else as_int)
    gen = generator if generator is not None else torch.default_generator
    state = gen.get_state()
    fields = state.numpy()
    # CPUGeneratorImplState: seed (u64), left (i32), seeded (i32), next (u64), the 624 words (u64 each), ...
    left, nxt = int(fields[8:12].view(np.int32)[0]), int(fields[16:24].view(np.uint64)[0])
    mt = fields[24 : 24 + 8 * N].view(np.uint64).astype(np.uint32)
    # Kept when (hi's low 21 bits, lo) as a 53-bit integer k satisfies k * 2^-53 < p, i.e. k < ceil(p * 2^53).
    bound = math.ceil(p * 2.0**53)
    left, nxt = _kernels.fill(mt, left, nxt, np.uint32(bound >> 32), np.uint32(bound & 0xFFFF_FFFF),
                             words(one) if value is None else value, out.view(-1).view(as_int).numpy().view(words))
    if not direct:
        target.copy_(out)
    fields[8:12].view(np.int32)[0], fields[16:24].view(np.uint64)[0] = left, nxt
    fields[24 : 24 + 8 * N].view(np.uint64)[:] = mt
    gen.set_state(state)
    return self


def _agrees_with_pytorch() -> bool:
    """Whether the kernel gives PyTorch's masks and stream here: checked once a process, on both
    dtypes training meets (fp32, bf16), which also compiles them (or loads them from Numba's
    cache) now rather than in the first timed step. A PyTorch whose generator state or sampler
    differs from the one this was written against fails it, and keeps its own kernel."""
    if torch.Generator().get_state().numel() != _STATE_BYTES:  # not the layout _bernoulli_ reads
        return False

    def draw(sampler: Any, dtype: torch.dtype, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1234)
        torch.rand(position, generator=generator)  # the kernel pairs words from odd and even positions alike
        return sampler(torch.empty(1001, dtype=dtype), generator), torch.rand(3, generator=generator)

    for dtype, position in itertools.product((torch.float32, torch.bfloat16), (5, 6)):
        quotient = _scaled_one(dtype, 0.9)
        pairs = [(lambda t, g: t.bernoulli_(0.9, generator=g), lambda t, g: _bernoulli_(t, 0.9, generator=g)),
                 # dropout's noise: the mask divided by the keep probability, and ours written at once
                 (lambda t, g: t.bernoulli_(0.9, generator=g).div_(0.9), lambda t, g, quotient=quotient: _fill(t, 0.9, g, quotient))]
        for theirs, ours in pairs:
            if not all(torch.equal(a, b) for a, b in zip(draw(theirs, dtype, position), draw(ours, dtype, position))):
                return False
    return True


def _load() -> Any:
    """:mod:`lorafit.mt_kernels`, imported and checked once; None where Numba is not installed or
    the kernel does not give PyTorch's masks."""
    global _kernels
    if _kernels is None:
        try:
            from lorafit import mt_kernels
        except ImportError:
            _kernels = False
        except (RuntimeError, OSError) as err:  # Numba present but unusable: no cache folder it may write
            warnings.warn(f"lorafit: PyTorch's dropout sampler stays ({type(err).__name__}: {err})", stacklevel=2)
            _kernels = False
        else:
            _kernels = mt_kernels
            if not _agrees_with_pytorch():
                warnings.warn("lorafit: the vectorised dropout sampler does not give this PyTorch's masks; "
                              "PyTorch's own stays", stacklevel=2)
                _kernels = False
    return _kernels or None
