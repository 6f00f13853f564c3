"""Which ``malloc`` the process runs on, and starting ``lorafit`` again on a faster one.

On the CPU a training step allocates and frees the same activations, of a different size for
every batch width, thousands of times a second. glibc's ``malloc`` serves them from a heap that
fragments as the widths vary: on the 2-core machines here the same MRPC batches step 10% slower
after one pass over all of MRPC's widths than before it, and whole MRPC runs train 1.25x as
fast on tcmalloc (docs/performance.md). PyTorch's CPU performance guide recommends preloading
tcmalloc or jemalloc for this reason; ``torch.backends.xeon.run_cpu`` does it as a launcher.

An allocator can only be chosen before the process starts (``LD_PRELOAD``): loading one later
would free glibc's blocks with another allocator. So the ``lorafit`` command starts itself again,
with the same arguments and the same process id (``exec``), with the library preloaded; library
code only reads which allocator is loaded. We do not reuse ``run_cpu`` because it looks only for
the unversioned ``libtcmalloc.so`` of a development package, and also pins threads and cores.

Without tcmalloc, :func:`reuse_freed_memory` (``--reuse-memory``) tells glibc's ``malloc`` to
keep freed activations for the next step rather than give them back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from lorafit.errors import LorafitError

# The libraries each allocator ships as, in order of preference: the ldconfig names that
# ctypes.util.find_library resolves (tcmalloc_minimal has no heap profiler, which we do not use).
LIBRARIES: dict[str, tuple[str, ...]] = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
INSTALL = {"tcmalloc": "Debian/Ubuntu: apt install libtcmalloc-minimal4; conda: conda install gperftools",
           "jemalloc": "Debian/Ubuntu: apt install libjemalloc2; conda: conda install jemalloc"}
# Set in the environment of the process lorafit started again, so it never loops.
_RELAUNCHED = "LORAFIT_ALLOCATOR_RELAUNCHED"


def active() -> str:
    """The allocator this process runs on: ``tcmalloc``, ``jemalloc`` or ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: nothing was preloaded by lorafit
        return "system"
    loaded = {allocator_of(line.split()[-1]) for line in maps.splitlines() if ".so" in line}
    return next((a for a in LIBRARIES if a in loaded), "system")


def allocator_of(path: str) -> str | None:
    """The allocator whose library ``path`` is (``.../libjemalloc.so.2``: ``jemalloc``), or None."""
    name = Path(path).name
    return next((a for a, libs in LIBRARIES.items() if any(name.startswith(f"lib{lib}.so") for lib in libs)), None)


def library(allocator: str) -> str | None:
    """The shared library of ``allocator`` installed on this machine, or None."""
    for name in LIBRARIES[allocator]:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def resolve(requested: str, device_type: str = "cpu") -> str:
    """What ``requested`` (``auto``, ``system``, ``tcmalloc``, ``jemalloc``) means here.

    ``auto`` is tcmalloc on a Linux CPU run where it is installed (measured faster there), else the
    system's allocator; a named allocator that is not installed is an error naming the package.
    """
    if requested == "auto":
        use = device_type == "cpu" and sys.platform.startswith("linux") and library("tcmalloc") is not None
        return "tcmalloc" if use else "system"
    if requested != "system" and library(requested) is None:
        raise LorafitError(f"--allocator {requested}: its library (lib{LIBRARIES[requested][0]}.so) is not "
                           f"installed ({INSTALL[requested]}), or use --allocator system")
    return requested


def preload(allocator: str, current: str = "") -> str:
    """``LD_PRELOAD`` for a process on ``allocator``: ``current`` without any allocator library,
    and ``allocator``'s library first unless it is the system's (two allocators must not mix)."""
    kept = [p for p in current.split(os.pathsep) if p and not allocator_of(p)]
    path = None if allocator == "system" else library(allocator)
    return os.pathsep.join([path, *kept] if path else kept)


def relaunch(allocator: str, argv: Sequence[str]) -> None:
    """Start ``lorafit argv`` again in this process on ``allocator`` unless it already runs on it.

    Returns only when nothing needs to change (or a relaunch already happened and the library
    did not load, in which case the run goes on and records the allocator it got).
    """
    if allocator == "system" or active() == allocator or os.environ.get(_RELAUNCHED):
        return
    if library(allocator) is None:  # resolve() said it is installed; a race with a package removal
        return
    env = {**os.environ, "LD_PRELOAD": preload(allocator, os.environ.get("LD_PRELOAD", "")), _RELAUNCHED: allocator}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lorafit", *argv], env)


def run_device_type(requested: str) -> str:
    """``cpu`` or ``cuda``: where a run of ``--device requested`` (``auto``, ``cpu``, ``cuda``) goes.

    The command asks before it starts itself again, and so before it imports torch, which takes
    about 1.2 s that the new process would spend again. A CPU build of torch says so in its
    version (``2.13.0+cpu``) and has no CUDA; any other build is asked.
    """
    if requested in ("cpu", "cuda"):
        return requested
    try:
        if metadata.version("torch").endswith("+cpu"):
            return "cpu"
    except metadata.PackageNotFoundError:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def relaunch_as_asked(requested: str, device_type: str) -> None:
    """The command line's part of ``--allocator``: start the running ``lorafit`` command again on
    the allocator ``requested`` resolves to for a run on ``device_type`` (``cpu``, ``cuda``),
    before it does any work. Only the process's own entry point may call this: it replaces the
    process."""
    relaunch(resolve(requested, device_type), sys.argv[1:])


def check_loaded(requested: str) -> str:
    """The allocator a run in this process gets, after checking that ``requested`` is it.

    For library callers (``lorafit.train.train``): the command line relaunches itself first, but
    a Python process cannot change its allocator any more.
    """
    got = active()
    if requested not in ("auto", "system", got):
        hint = library(requested) or f"lib{LIBRARIES[requested][0]}.so"
        raise LorafitError(f"allocator: {requested} is not loaded in this process; it must be preloaded when "
                           f"Python starts (LD_PRELOAD={hint}), which the lorafit command does itself")
    return got


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
