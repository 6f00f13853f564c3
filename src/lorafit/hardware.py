"""What a run ran on: the device and CPU, torch's version and threads, and peak memory."""

from __future__ import annotations

import platform
import resource
import sys
from typing import Any

import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory, or the CPU's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def hardware_info(device: torch.device) -> dict[str, Any]:
    """The device type, CPU (and GPU) name, torch version and thread count, for run summaries."""
    info = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
