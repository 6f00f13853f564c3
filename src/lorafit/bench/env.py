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


# Where the model name is generic ("AMD EPYC" on a VM), family and model tell the generations
# apart (AMD family 25 is Zen 3 or Zen 4 by model, family 26 Zen 5), whose bf16 matmul speeds differ.
_IDENTITY = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping"}


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str], dict[str, str | int]]:
    """The first processor's model name, flags and identity (vendor, family, model, stepping)."""
    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if not key and ident:  # the blank line after the first processor
                    break
                if key == "model name":
                    model = value
                elif key == "flags":
                    flags = set(value.split())
                elif key in _IDENTITY:
                    ident[_IDENTITY[key]] = int(value) if value.isdigit() else value
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return model, flags, ident


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

    model, _, ident = _cpuinfo()
    info: dict[str, Any] = {
        "device": device,
        "cpu": model,
        "cpu_id": ident,
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


def cpu_name(env: dict[str, Any]) -> str:
    """The CPU of a record's environment, with its family and model where recorded (since 2026-12-07)."""
    ident = env.get("cpu_id") or {}
    return env.get("cpu", "") + (f" family {ident['family']} model {ident['model']}" if "family" in ident else "")
