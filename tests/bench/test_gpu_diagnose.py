"""scripts/gpu_diagnose.py, the GPU step's diagnosis, runs end to end without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_diagnose_runs_on_the_cpu_and_reports_each_side(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_diagnose.py"), "--device", "cpu", "--model", "minilm",
         "--batch-size", "4", "--length", "32", "--steps", "2", "--warmup", "1", "--rows", "5",
         "--skip", "compile", "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "gpu_diagnose.txt").read_text(encoding="utf-8")
    lorafit, peft = (float(m) for m in re.findall(r"^== (?:lorafit|peft) eager.*?: ([\d.]+) ms/step", report, re.MULTILINE))
    assert lorafit > 0 and peft > 0
    # The whole-step side's bookkeeping, over the eager model (--skip compile; no capture on a CPU).
    assert float(re.search(r"^== lorafit step-graph: .* then ([\d.]+) ms/step", report, re.MULTILINE)[1]) > 0
    assert re.search(r"self CPU [\d.]+ ms/step, self GPU 0\.00 ms/step", report)  # no GPU here: no GPU time
    assert "aten::mm" in report and "nothing to synchronise with" in report
    assert "lorafit compiled" not in report  # --skip compile
