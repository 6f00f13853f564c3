"""scripts/matmul_threads.py, the products of a frozen layer timed by thread count, runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "matmul_threads.py"), *args],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_matmul_threads_times_both_products_and_both_forms_at_each_thread_count(tmp_path):
    out = tmp_path / "m.json"
    done = _run("--rows", "8,16", "--shapes", "12x20", "--threads", "1,2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text(encoding="utf-8"))
    assert "cpu" in record["environment"] and "threads" in record["environment"]
    rows = record["results"]
    assert [(r["product"], r["rows"], r["in"], r["out"]) for r in rows] == [
        ("forward", 8, 12, 20), ("input_grad", 8, 12, 20), ("forward", 16, 12, 20), ("input_grad", 16, 12, 20)]
    for r in rows:
        assert set(r["us"]) == set(r["us_split"]) == {"1", "2"}  # JSON keys
        assert all(v > 0 for v in (*r["us"].values(), *r["us_split"].values()))
        assert isinstance(r["same_bits_split"], bool)
    assert done.stdout.count("from 2 threads") == 4


def test_matmul_threads_refuses_odd_rows():
    done = _run("--rows", "7")
    assert done.returncode == 2 and "--rows: expected even row counts" in done.stderr


def test_the_split_forms_compute_the_same_products():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("matmul_threads", ROOT / "scripts" / "matmul_threads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    for name, (whole, split) in module.products(rows=10, n_in=12, n_out=20).items():
        a, b = whole(), split()
        assert a.shape == b.shape == ((10, 20) if name == "forward" else (10, 12))
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)  # bf16: the same product, maybe other roundings
