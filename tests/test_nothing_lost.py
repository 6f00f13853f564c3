"""Destructive cases: a full disk, a write onto the input, an interrupted overwrite, a diverging
run, and a kill between an evaluation's metrics line and its checkpoint. Nothing is lost."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.config import make_config
from lorafit.train import train

SMALL = {"task": "rte", "max_train_samples": 32, "max_eval_samples": 16, "batch_size": 8, "eval_batch_size": 16,
         "max_length": 32, "progress": False, "num_threads": 1, "max_steps": 4, "eval_steps": 2,
         "learning_rate": 1e-3}
FLAGS = ["--task", "rte", "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "8",
         "--eval-batch-size", "16", "--max-length", "32", "--no-progress", "--num-threads", "1",
         "--max-steps", "4", "--eval-steps", "2", "--learning-rate", "1e-3"]


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli_limited(args: list[str], max_file_bytes: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI in a subprocess whose files may not grow past ``max_file_bytes`` (a full disk)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-m", "lorafit.cli", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit, env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, interrupt_after):
    """A finished run (4 steps, evaluations at 2 and 4) and the same run stopped after step 2."""
    root = tmp_path_factory.mktemp("lost")
    train(make_config(**SMALL, output_dir=str(root / "full")))
    with interrupt_after(2), pytest.raises(KeyboardInterrupt):
        train(make_config(**SMALL, output_dir=str(root / "stopped")))
    return root


def test_a_full_disk_during_training_keeps_the_last_checkpoint_and_adapter(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    before = {k: v for k, v in checksums(run).items() if not k.startswith("metrics")}
    # 150 kB: the config and a metrics line fit; neither the adapter (300 kB) nor the checkpoint do.
    result = cli_limited(["train", *FLAGS, "--output-dir", str(run), "--resume"], 150_000, dict(os.environ))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("lorafit:")]
    assert len(error) == 1 and str(run) in error[0] and "File too large" in error[0], result.stderr
    after = checksums(run)
    assert {k: v for k, v in after.items() if not k.startswith(("metrics", "train_loss"))} == before  # adapter, checkpoint kept (logs are trimmed on resume)
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".new", ".old"))]
    # The run resumes from the kept checkpoint and ends as the uninterrupted run did, one line per evaluation.
    train(make_config(**SMALL, output_dir=str(run), resume=True))
    assert steps(run) == [2, 4]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (runs / "full" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_full_disk_at_the_first_save_leaves_no_best_line_beside_a_missing_adapter(runs, tmp_path):
    run = tmp_path / "run"
    result = cli_limited(["train", *FLAGS, "--output-dir", str(run)], 150_000, dict(os.environ))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "adapter" in result.stderr and "File too large" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # no metrics line, no empty adapter/


def test_an_interrupted_merge_overwrite_keeps_the_old_merged_model(runs, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(runs / "full"), "--output", str(out)]) == 0
    before = checksums(out)
    result = cli_limited(["merge", str(runs / "full"), "--output", str(out), "--overwrite"], 1_000_000,
                         dict(os.environ))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert checksums(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_onto_its_own_run_is_refused_and_the_run_still_evaluates(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    before = checksums(run)
    for output in (run, run / "merged", run.parent):
        assert main(["merge", str(run), "--output", str(output), "--overwrite"]) == 2
    assert checksums(run) == before
    assert main(["eval", str(run)]) == 0


def test_a_kill_between_a_metrics_line_and_its_checkpoint_records_the_evaluation_once(runs, tmp_path):
    # What a kill leaves there: the step-4 evaluation is written (adapter, metrics line), but the
    # checkpoint is still the one of step 2.
    run = tmp_path / "run"
    shutil.copytree(runs / "stopped", run)
    full_lines = (runs / "full" / "metrics.jsonl").read_text().splitlines()
    with open(run / "metrics.jsonl", "a") as f:
        f.write(full_lines[1] + "\n")
    train(make_config(**SMALL, output_dir=str(run), resume=True))
    assert steps(run) == [2, 4]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint_and_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    # Adam's first steps at this rate still evaluate; a few later ones overflow the weights.
    args = ["train", *FLAGS, "--learning-rate", "1e6", "--warmup-ratio", "0", "--eval-steps", "1",
            "--save-steps", "1", "--max-steps", "12", "--output-dir", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged" in err[0], err
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["status"] == "diverged" and 1 < stopped < 12 and f"by step {stopped}" in err[0]
    assert steps(run) == list(range(1, stopped))  # every evaluation before the divergence, none after
    assert summary["best_step"] < stopped
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == stopped - 1
    for path in (run / "adapter" / "adapter_model.safetensors", run / "checkpoint" / "trainable.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values())
    assert main(["eval", str(run)]) == 0  # the kept adapter is usable
    assert main([*args[:-2], "--output-dir", str(run)]) == 2  # and not silently replaced
    assert "pass --resume" in capsys.readouterr().err
