"""scripts/step_time.py, steady-state ms a step by setting in one process, runs end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "step_time.py"), "--task", "mrpc", "--batch-size", "4",
                           "--threads", "1", "--rounds", "1", "--steps", "1", *args],
                          check=False, capture_output=True, text=True, env=env, timeout=600)


def test_step_time_with_the_peak_gives_each_setting_its_share_of_it(tmp_path):
    settings = ["plain", "full_rows", "plain-attention-gelu"]
    done = _run("--settings", ",".join(settings), "--peak", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("mrpc-b4-step-time*.json")).read_text(encoding="utf-8"))
    assert set(result["ms_per_step"]) == set(result["gflop_per_step"]) == set(settings)
    peak = result["peak_gflops"]
    assert len(peak["measured"]) == 2 and peak["used"] == max(peak["measured"]) > 0
    gflop = result["gflop_per_step"]
    # The defaults cut the last layer to its first row, query included; without lorafit's attention
    # (taken out here) only past the attention; full_rows computes every row.
    assert gflop["plain"] < gflop["plain-attention-gelu"] < gflop["full_rows"]
    line = re.compile(r"^(\S+)\s+([\d.]+) ms a step .* ([\d.]+) GFLOP/s = ([\d.]+)% of peak$", re.MULTILINE)
    shares = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4))) for m in line.finditer(done.stdout)}
    assert set(shares) == set(settings)
    for setting, (ms, gflops, share) in shares.items():  # (each printed rounded)
        rate = gflop[setting] / ms * 1e3
        assert abs(gflops - rate) <= 0.5 + 0.01 * rate
        assert abs(share - 100 * rate / peak["used"]) <= 0.05 + 0.01 * share


def test_step_time_names_an_unknown_part():
    done = _run("--settings", "plain-attention-softmax")
    assert done.returncode == 2
    assert "--settings: unknown ['plain-attention-softmax']" in done.stderr
