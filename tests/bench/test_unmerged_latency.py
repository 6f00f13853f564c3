"""scripts/unmerged_latency.py, unmerged LoRA's batch-1 latency by implementation in one process, runs end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "unmerged_latency.py"), "--calls", "2", "--warmup", "1", *args],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_unmerged_latency_times_every_variant_against_the_base_model():
    done = _run("--compare-layer", str(ROOT / "src" / "lorafit" / "lora" / "layer.py"), "--packed")
    assert done.returncode == 0, done.stderr[-2000:]
    line = re.compile(r"^(\S+)\s+median\s+([\d.]+) ms\s+paired overhead ([+-][\d.]+)%$", re.MULTILINE)
    lines = {m.group(1): float(m.group(3)) for m in line.finditer(done.stdout)}
    assert set(lines) == {"base", "unmerged", "unmerged-again", "unmerged-compared", "unmerged-packed"}
    assert lines["base"] == 0.0
    assert "batch 1, bf16, 2 inputs" in done.stdout


def test_unmerged_latency_stops_where_an_implementation_changes_the_logits(tmp_path):
    # A "layer" that drops the LoRA branch computes another function: the comparison must say so.
    layer = tmp_path / "layer.py"
    layer.write_text(
        "from torch import nn\n\n"
        "class LoRALinear(nn.Module):\n"
        "    def __init__(self, base_layer, r, alpha):\n"
        "        super().__init__()\n\n"
        "    def forward(self, x):\n"
        "        return self.base_layer(x)\n", encoding="utf-8")
    done = _run("--compare-layer", str(layer))
    assert done.returncode != 0 and "the unmerged variants' logits differ" in done.stderr
