"""scripts/gpu_check.sh waits for a GPU session, which is rare and short: each of its bench calls
must be accepted as written, so that no step of it is spent on a refused flag."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from lorafit.cli import main

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _bench_calls() -> list[tuple[str, list[str]]]:
    """``(name, bench arguments)`` of each ``step NAME SECONDS ARGS...`` line, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text(encoding="utf-8"))
    calls = [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("step ")]
    return [(name, [*args, "--output", "out.jsonl"]) for name, _seconds, *args in calls]


class _WorkerStarted(Exception):
    pass


def test_the_script_has_its_steps():
    names = [name for name, _ in _bench_calls()]
    assert names == ["roberta_b64_dynamic", "roberta_b16_pad128", "minilm_mrpc_step_graph", "roberta_infer"]


@pytest.mark.parametrize(("name", "argv"), _bench_calls(), ids=[name for name, _ in _bench_calls()])
def test_each_bench_call_of_the_gpu_script_is_accepted(name, argv, monkeypatch, tmp_path):
    # As far as a CPU can tell: CUDA is said to be there, and the call must get as far as starting
    # its first worker (the matmul peak or the first side) without refusing anything.
    from lorafit.bench import runner

    def first_worker(spec, threads):
        raise _WorkerStarted(spec["mode"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "run_worker", first_worker)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_WorkerStarted):
        main(["bench", *argv])
