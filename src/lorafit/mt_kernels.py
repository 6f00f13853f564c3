"""The vectorised MT19937 kernels behind :mod:`lorafit.mt_masks` (Numba; imported only there).

A separate module so that importing lorafit does not import Numba, and so that Numba can cache
the compiled kernels on disk (it caches module-level functions, not closures).
"""

from __future__ import annotations

import numba
import numpy as np

N, M = 624, 397  # MT19937's words of state, and the distance of the word each new word mixes in
_UPPER, _LOWER, _A = np.uint32(0x8000_0000), np.uint32(0x7FFF_FFFF), np.uint32(0x9908_B0DF)
_ONE, _ZERO, _LOW21 = np.uint32(1), np.uint32(0), np.uint32(0x1F_FFFF)
_CHUNK = 32  # states computed ahead, then consumed: 80 KiB, which stays in L2

_jit = numba.njit(cache=True, boundscheck=False)


@numba.njit(inline="always")
def _mix(u, v):  # MT19937's twist of two neighbouring words
    return (((u & _UPPER) | (v & _LOWER)) >> _ONE) ^ ((_ZERO - (v & _ONE)) & _A)


@numba.njit(inline="always")
def _temper(y):
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C_5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC6_0000)
    return y ^ (y >> np.uint32(18))


# Separate arrays for source and destination, and loops from 0: that is what lets LLVM vectorise
# the two kernels below (offsets into one buffer kept them scalar, 7x slower).
@_jit
def _twist(src, dst):  # dst = the state after src
    for i in range(N - M):
        dst[i] = src[i + M] ^ _mix(src[i], src[i + 1])
    for i in range(N - M, N - 1):
        dst[i] = dst[i + M - N] ^ _mix(src[i], src[i + 1])
    dst[N - 1] = dst[M - 1] ^ _mix(src[N - 1], dst[0])


@_jit
def _pairs(words, bound_hi, bound_lo, one, out):  # one element from each two words
    zero = type(one)(0)
    for q in range(out.shape[0]):
        hi = _temper(words[2 * q]) & _LOW21
        lo = _temper(words[2 * q + 1])
        out[q] = one if (hi < bound_hi) | ((hi == bound_hi) & (lo < bound_lo)) else zero


# _temper on both 32-bit halves of a 64-bit word at once: each shift's bits that would cross into
# the other half are masked off (the left shifts' masks are zero where they would land already).
_T11, _T18 = np.uint64(0x001F_FFFF_001F_FFFF), np.uint64(0x0000_3FFF_0000_3FFF)
_T7, _T15 = np.uint64(0x9D2C_5680_9D2C_5680), np.uint64(0xEFC6_0000_EFC6_0000)
_HALF = np.uint64(32)


@_jit
def _pairs64(words, bound, one, out):
    """:func:`_pairs` on pairs that start at an even word, each read as one little-endian 64-bit
    word (``hi`` its low half): 64-bit lanes and no shuffles; a whole mask 1.12-1.17x as fast."""
    zero = type(one)(0)
    for q in range(out.shape[0]):
        y = words[q]
        y ^= (y >> np.uint64(11)) & _T11
        y ^= (y << np.uint64(7)) & _T7
        y ^= (y << np.uint64(15)) & _T15
        y ^= (y >> np.uint64(18)) & _T18
        out[q] = one if ((y & np.uint64(0x1F_FFFF)) << _HALF) | (y >> _HALF) < bound else zero


@_jit
def fill(mt, left, nxt, bound_hi, bound_lo, one, out):
    """Fill ``out`` with ``one`` where an element is kept, else 0, as PyTorch's ``bernoulli_`` does.

    ``mt`` (updated in place), ``left`` and ``nxt`` are PyTorch's mt19937 state: words ``nxt`` to
    623 of ``mt`` are still to be used; where ``left`` is 1 none is, and the next word needs the
    next state. An element takes two words ``hi, lo`` and is kept when
    ``(hi & 0x1FFFFF) * 2^32 + lo < bound`` (``bound_hi``, ``bound_lo``: its upper and lower 32
    bits). Returns the new ``left, nxt``.
    """
    n = out.shape[0]
    bound = (np.uint64(bound_hi) << _HALF) | np.uint64(bound_lo)
    buf = np.empty((_CHUNK + 1) * N, np.uint32)  # the current state, then the states after it
    buf[:N] = mt
    pos = nxt if left > 1 else N
    e = 0
    while True:
        filled = N
        while filled - pos < 2 * (n - e) and filled < (_CHUNK + 1) * N:
            _twist(buf[filled - N : filled], buf[filled : filled + N])
            filled += N
        count = min(2 * (n - e), filled - pos) // 2
        if pos % 2 == 0:  # (pos only moves by even steps, so this holds for the whole call)
            _pairs64(buf[pos : pos + 2 * count].view(np.uint64), bound, one, out[e : e + count])
        else:
            _pairs(buf[pos : pos + 2 * count], bound_hi, bound_lo, one, out[e : e + count])
        e += count
        pos += 2 * count
        if e == n:
            break
        buf[:N] = buf[filled - N : filled]  # the last state, an odd word left in it if any
        pos -= filled - N
    block = (pos - 1) // N  # the state holding the last word used
    mt[:] = buf[block * N : (block + 1) * N]
    nxt = pos - block * N
    return N + 1 - nxt, nxt
