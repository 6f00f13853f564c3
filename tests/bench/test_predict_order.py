"""scripts/predict_order.py, `lorafit predict`'s longest-first batches against the input's order, runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lorafit.config import make_config
from lorafit.data import get_task, load_split

ROOT = Path(__file__).resolve().parents[2]


def test_predict_order_times_both_orders_on_the_same_examples(tmp_path):
    from lorafit.train import train

    train(make_config(task="mrpc", max_train_samples=16, max_eval_samples=8, batch_size=8, max_length=64,
                      progress=False, num_threads=1, max_steps=1, output_dir=str(tmp_path / "run")))
    dev = load_split(get_task("mrpc"), "validation", None)
    inputs = tmp_path / "pairs.txt"
    inputs.write_text("".join(f"{a.strip()}\t{b.strip()}\n" for a, b in zip(dev.text_a[:12], dev.text_b[:12])),
                      encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict_order.py"), str(tmp_path / "run"),
                           "--input", str(inputs), "--batch-size", "4", "--rounds", "1", "--threads", "1",
                           "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [record] = (tmp_path / "out").glob("pairs-b4-*.json")  # named by the precision the run trained in
    result = json.loads(record.read_text())
    assert result["examples"] == 12 and set(result["median_seconds"]) == {"longest_first", "input_order"}
    assert all(len(ts) == 1 and ts[0] > 0 for ts in result["seconds"].values())
    padded = result["padded_tokens"]
    assert result["real_tokens"] <= padded["longest_first"] < padded["input_order"]
    assert result["labels_agree"] == 12  # the same model on the same examples, batched otherwise
    assert "longest first:" in done.stdout and "x the input order" in done.stdout
