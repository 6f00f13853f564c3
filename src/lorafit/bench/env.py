"""What a measurement ran on: CPU model and its matrix-unit flags, threads, library versions.

Every figure the bench writes carries this record, so that numbers from different machines are
never compared by accident (AMX-BF16 Xeons and AVX-512-BF16 EPYCs differ by several times in
bf16 matmul speed).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from lorafit.allocator import active as active_allocator

# CPU flags (as /proc/cpuinfo spells them) that decide how fast bf16 matmuls can run.
MATRIX_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
VERSIONED = ("torch", "transformers", "accelerate", "peft", "numba", "lorafit")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.processor(), platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return model, flags


def cpu_flags() -> dict[str, bool]:
    """Which of the matrix-relevant flags this CPU has (all False where /proc/cpuinfo is missing)."""
    flags = _cpuinfo()[1]
    return {f: f in flags for f in MATRIX_FLAGS}


def cpu_has_bf16_matmul() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AMX or AVX-512 BF16), so bf16 pays off."""
    flags = cpu_flags()
    return flags["amx_bf16"] or flags["avx512_bf16"]


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share one core's matrix units)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # psutil comes with accelerate; be safe anyway
        cores = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores or usable, usable))


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out.get("lorafit") is None:  # run from a source tree (PYTHONPATH=src)
        from lorafit import __version__

        out["lorafit"] = __version__
    return out


def environment(device: str = "cpu") -> dict[str, Any]:
    """The record stored with every figure: hardware, threads and versions."""
    import torch  # here, not at the top: `lorafit --help` builds the bench's parser from this package

    model, _ = _cpuinfo()
    info: dict[str, Any] = {
        "device": device,
        "cpu": model,
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": torch.get_num_threads(),
        "allocator": active_allocator(),
        "platform": sys.platform,
        "versions": versions(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
