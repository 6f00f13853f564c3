"""Several processes (CPU, gloo) train exactly like one: batches, loss weighting, evaluation, resume.

The end-to-end tests launch real processes: ``torchrun`` on the CLI, as a user would, and
``torch.multiprocessing`` on :func:`lorafit.train.train` (the same code path; Accelerate reads
the same environment variables) where a test must interrupt training at a chosen step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.distributed import global_batches, local_slice

# Both runs see the same 37 examples: global batches of 8, 8, 8, 8 and a short one of 5 (split 3 + 2).
COMMON = ["--task", "rte", "--max-train-samples", "37", "--max-eval-samples", "20", "--eval-batch-size", "8",
          "--epochs", "2", "--max-length", "48", "--learning-rate", "1e-3", "--log-steps", "1",
          "--save-steps", "3", "--lora-dropout", "0.0", "--no-progress", "--num-threads", "1",
          "--precision", "fp32"]  # fp32: the tolerances below are fp32's (bf16 rounds half-batches differently)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer random BERT without dropout (so only the data decides the trajectory)."""
    from transformers import BertConfig, BertModel

    from lorafit.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_loss.jsonl").read_text().splitlines()]


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


# -- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "n"), [(8, 2), (5, 2), (7, 3), (4, 4)])
def test_weighted_slices_average_to_the_global_mean(size, n):
    batch = np.arange(100, 100 + size)
    losses = np.random.default_rng(0).random(200)  # a per-example loss
    parts = [local_slice(batch, n, p) for p in range(n)]
    assert np.array_equal(np.concatenate([part for part, _ in parts]), batch)  # nothing dropped or repeated
    # DDP averages the processes' gradients: the mean of the weighted slice means is the global mean.
    averaged = np.mean([weight * losses[part].mean() for part, weight in parts])
    assert averaged == pytest.approx(losses[batch].mean(), rel=1e-12)
    alone, weight = local_slice(batch, 1, 0)
    assert np.array_equal(alone, batch) and weight == 1.0  # one process: the loss is left exactly as it is


def test_a_trailing_batch_smaller_than_the_process_count_is_dropped():
    order = [np.arange(8), np.arange(8, 9)]
    assert len(global_batches(order, 1)) == 2
    assert [len(b) for b in global_batches(order, 2)] == [8]


def test_sweep_refuses_to_run_under_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "--grid", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "sweep runs as one process but was launched as 2" in err and "lorafit train" in err


def test_one_process_can_change_precision_between_runs():
    from lorafit.distributed import make_accelerator

    assert make_accelerator("no").mixed_precision == "no"
    accelerator = make_accelerator("bf16")  # Accelerate alone refuses a second, different state
    assert accelerator.mixed_precision == "bf16" and accelerator.num_processes == 1


def test_shipped_accelerate_configs_load_as_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    from lorafit.accelerate import CONFIG_DIR, config_path

    files = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert files == ["ddp", "fsdp", "zero2", "zero3"]
    loaded = {name: load_config_from_file(str(config_path(name))) for name in files}
    assert loaded["ddp"].distributed_type.value == "MULTI_GPU"
    fsdp = loaded["fsdp"].fsdp_config
    assert loaded["fsdp"].distributed_type.value == "FSDP" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert [loaded[z].deepspeed_config["zero_stage"] for z in ("zero2", "zero3")] == [2, 3]


def test_fsdp_wraps_by_the_encoders_layer_class(tiny_bert):
    from types import SimpleNamespace

    from lorafit.distributed import fill_fsdp_wrap_policy
    from lorafit.models import load_model

    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
    model, _ = load_model(tiny_bert, 2)
    fill_fsdp_wrap_policy(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer"]


# -- end to end -------------------------------------------------------------------------------


def test_two_processes_at_half_the_batch_train_exactly_like_one(tmp_path, tiny_bert):
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "lorafit.cli", "train", "--model", tiny_bert, *COMMON,
                             "--batch-size", "8", "--output-dir", str(one)],
                            check=False, capture_output=True, text=True, timeout=120, env=_env())
    assert single.returncode == 0, single.stderr
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(_free_port()), "-m", "lorafit.cli", "train",
                               "--model", tiny_bert, *COMMON, "--batch-size", "4", "--output-dir", str(two)],
                              check=False, capture_output=True, text=True, timeout=180, env=_env())
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 processes (MULTI_CPU, gloo) on cpu: global batch 8 = 4 per process x 2 processes" in launched.stdout
    assert launched.stdout.count("adapter saved") == 1  # one process reports

    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 10  # 5 global batches per epoch (37 examples), 2 epochs
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    print(f"max loss difference {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    wa, wb = _adapter(one), _adapter(two)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0)
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # the adapter did train
    print(f"max adapter difference {max((wa[k] - wb[k]).abs().max().item() for k in wa):.2e}")

    metrics_a = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    metrics_b = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_b] == [5, 10]  # one line per evaluation: written once
    assert [m["accuracy"] for m in metrics_b] == [m["accuracy"] for m in metrics_a]
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert summary_b["num_processes"] == 2 and summary_a["num_processes"] == 1
    assert summary_a["global_batch_size"] == summary_b["global_batch_size"] == 8
    assert summary_b["best_metric"] == summary_a["best_metric"] and summary_b["steps"] == 10


def _worker(rank: int, world: int, port: int, kwargs: dict, interrupt: int | None, result: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from lorafit.config import make_config
    from lorafit.progress import Progress
    from lorafit.train import train

    if interrupt is not None:  # as conftest's interrupt_after, which cannot reach a spawned process
        advance = Progress.advance

        def advance_then_stop(self, *args, **kwargs):
            advance(self, *args, **kwargs)
            if self.step > interrupt:
                raise KeyboardInterrupt

        Progress.advance = advance_then_stop
    try:
        train(make_config(**kwargs))
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{result}.{rank}", "w") as f:
        f.write(outcome)


def _launch(tmp_path, kwargs: dict, interrupt: int | None = None) -> list[str]:
    result = str(tmp_path / "outcome")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), kwargs, interrupt, result), nprocs=2)
    return [open(f"{result}.{rank}").read() for rank in range(2)]


@pytest.mark.slow  # three 2-process launches: ~30 s on a quiet 2-core machine, more on a busy one
def test_interrupted_two_process_run_resumes_to_the_same_adapter(tmp_path, tiny_bert):
    from lorafit.config import make_config
    from lorafit.errors import LorafitError
    from lorafit.train import train

    # LoRA dropout on: each process's RNG stream must be restored, not only the main one's.
    common = {"model": tiny_bert, "task": "rte", "max_train_samples": 37, "max_eval_samples": 20,
              "eval_batch_size": 8, "batch_size": 4, "epochs": 2, "max_length": 48, "learning_rate": 1e-3,
              "log_steps": 1, "save_steps": 3, "lora_dropout": 0.1, "progress": False, "num_threads": 1}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _launch(tmp_path, {**common, "output_dir": str(straight)}) == ["finished"] * 2
    assert _launch(tmp_path, {**common, "output_dir": str(resumed)}, interrupt=7) == ["interrupted"] * 2
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and not (resumed / "summary.json").exists()
    with pytest.raises(LorafitError, match="written by a run on 2 process"):
        train(make_config(**common, output_dir=str(resumed), resume=True))  # here: one process
    assert _launch(tmp_path, {**common, "output_dir": str(resumed), "resume": True}) == ["finished"] * 2

    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(resumed) == _losses(straight)  # steps 7.. trained again, logged once
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "train_seconds"}
    lines = [[strip(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert lines[0] == lines[1] and len(lines[0]) == 2
