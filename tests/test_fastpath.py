"""The fast path's pieces: precision choice, frozen bf16 weights, length buckets, the GPU choices.

The GPU-only choices (CUDA graphs, pinned copies) are decided by small functions that are
exercised here on the CPU, so a machine without CUDA can neither break nor skip them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafit import fastpath
from lorafit.config import make_config
from lorafit.data.batching import collate
from lorafit.errors import LorafitError, LorafitWarning
from lorafit.lora import LoRAConfig, inject_lora


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    from lorafit.bench import env

    cpu = torch.device("cpu")
    monkeypatch.setattr(env, "cpu_flags", lambda: {f: f == "avx512_bf16" for f in env.MATRIX_FLAGS})
    assert fastpath.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(env, "cpu_flags", lambda: {f: f == "avx2" for f in env.MATRIX_FLAGS})
    assert fastpath.resolve_precision("auto", cpu) == "fp32"
    assert fastpath.resolve_precision("fp32", cpu) == "fp32"


def test_frozen_bf16_is_on_for_bf16_lora_only_and_refused_where_it_cannot_work():
    assert fastpath.resolve_frozen_bf16(None, "bf16", "lora") is True
    assert fastpath.resolve_frozen_bf16(None, "fp32", "lora") is False
    assert fastpath.resolve_frozen_bf16(None, "bf16", "full") is False
    assert fastpath.resolve_frozen_bf16(False, "bf16", "lora") is False
    with pytest.raises(LorafitError, match="--frozen-bf16 .* needs --method lora and --precision bf16"):
        fastpath.resolve_frozen_bf16(True, "fp32", "lora")


def test_frozen_bf16_base_gives_the_autocast_products_exactly():
    """Autocast casts each fp32 weight to bf16 at every step; storing it in bf16 once is the same rounding."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=37, vocab_size=99, initializer_range=0.2))
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["query", "value"]).resolved("bert"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    ids = torch.randint(0, 99, (3, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
    cast = fastpath.cast_frozen_linears(model)
    assert cast == 2 * 4 + 2 * 2 + 1  # per layer: 4 attention projections (q, v wrapped) + 2 FFN; the pooler
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}  # LoRA factors and head stay fp32
    assert model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32


def test_length_buckets_bound_the_batch_shapes():
    assert fastpath.bucket_lengths(None, 128, compile=False) is None
    assert fastpath.bucket_lengths(None, 100, compile=True) == (16, 32, 48, 64, 96, 100)
    assert fastpath.bucket_lengths([64, 32, 64], 128, compile=False) == (32, 64)
    assert [fastpath.padded_width(w, (16, 32)) for w in (3, 16, 17, 40)] == [16, 16, 32, 40]


def test_collate_pads_up_to_the_bucket(tmp_path):
    from lorafit.data.tokenization import Encoded

    lengths = np.array([3, 7, 5])
    data = Encoded(input_ids=np.arange(1, 16, dtype=np.int32), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                   token_type_ids=None, labels=np.array([0, 1, 0]), split="train", max_length=16,
                   is_regression=False, cache_key="x")
    batch = collate(data, [0, 2], pad_token_id=0, length_buckets=(4, 8, 16))
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].sum().item() == 8
    assert collate(data, [0, 2], pad_token_id=0)["input_ids"].shape == (2, 5)


def test_gpu_choices_are_made_without_a_gpu():
    assert fastpath.compile_mode("auto", torch.device("cuda")) == "reduce-overhead"
    assert fastpath.compile_mode("auto", torch.device("cpu")) == "default"
    assert fastpath.compile_mode("max-autotune-no-cudagraphs", torch.device("cuda")) == "max-autotune-no-cudagraphs"
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert fastpath.to_device(batch, torch.device("cpu"))["input_ids"] is batch["input_ids"]
    params = [torch.zeros(2, requires_grad=True)]
    assert fastpath.adamw_kwargs(True, params) == {"fused": True}
    assert fastpath.adamw_kwargs(False, params) == {"foreach": False}
    if not torch.cuda.is_available():
        with pytest.raises(LorafitError, match="--device cuda: no CUDA device"):
            fastpath.resolve_device("cuda")
    assert fastpath.resolve_device("cpu").type == "cpu"


def test_shape_timer_sets_each_shapes_warmup_steps_apart_from_the_steady_speed():
    import time

    from lorafit.progress import Progress

    # Two warm-up steps a shape (CUDA graphs: compile, then record): of 5 steps over 2 shapes, 4 are
    # warm-up; the steady speed is the one remaining step's examples over its own time.
    assert fastpath.compile_warmup_steps("reduce-overhead") == 2 and fastpath.compile_warmup_steps("default") == 1
    timer, progress = fastpath.ShapeTimer(torch.device("cpu"), enabled=True, warmup_steps=2), Progress()
    started = time.perf_counter()
    for shape, examples, pause in [((16, 32), 16, 0.02), ((16, 32), 16, 0.02), ((8, 64), 8, 0.02),
                                   ((16, 32), 16, 0.01), ((8, 64), 8, 0.02)]:
        timer.start(shape, progress)
        time.sleep(pause)
        progress.advance([np.arange(examples)], np.full(16, 10), epoch_done=False)
        timer.stop(progress)
    progress.train_seconds = time.perf_counter() - started
    assert timer.seen == {(16, 32): 2, (8, 64): 2} and timer.steps == 4
    assert (timer.examples, timer.tokens) == (48, 480) and progress.examples == 64
    steady = timer.steady_speed(progress)
    assert steady["examples_per_second"] == pytest.approx(16 / (progress.train_seconds - timer.seconds), rel=1e-3)
    assert steady["examples_per_second"] > 16 / progress.train_seconds  # the warm-up's time is left out
    off = fastpath.ShapeTimer(torch.device("cpu"), enabled=False)
    off.start((1,), progress)
    off.stop(progress)
    assert off.seconds == 0 and not off.seen and off.steady_speed(progress) == {}


def test_speed_flags_are_validated():
    with pytest.raises(LorafitError, match="--length-buckets must be positive integers"):
        make_config(length_buckets=[0, 32])
    # Past --max-length a bucket only pads (here past MiniLM's 512 positions, which crashed a step).
    with pytest.raises(LorafitError, match=r"--length-buckets must be at most --max-length 128, no batch is longer; got \[64, 1000\]"):
        make_config(length_buckets=[64, 1000])
    assert make_config(length_buckets=[64, 128]).length_buckets == [64, 128]
    with pytest.raises(LorafitError, match="--compile-mode must be one of"):
        make_config(compile_mode="fast")
    with pytest.raises(LorafitError, match="--precision must be one of 'auto'"):
        make_config(precision="int8")


def test_random_shipped_architecture_trains_without_weights_or_segment_ids(tmp_path):
    """`--model random:roberta-base` (what `lorafit bench --model roberta-base` uses): no download,
    and the embedded tokenizer's segment ids are dropped, as RoBERTa has none."""
    from lorafit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("random:roberta-base")
    assert "token_type_ids" not in tokenizer("a", "b")
    model, new = load_model("random:roberta-base", 3)
    assert model.config.model_type == "roberta" and model.config.num_labels == 3 and new == ["classifier"]
    assert not any(p.is_meta for p in model.parameters())


def test_embedded_model_can_come_from_a_carried_fp16_copy(tmp_path, monkeypatch):
    from lorafit.bench.carry import write_fp16_copy
    from lorafit.models import EMBEDDED_ENV, load_model

    reference, _ = load_model("minilm", 2)
    copy = write_fp16_copy(tmp_path / "minilm-fp16")
    assert (copy / "model.safetensors").stat().st_size < 48 * 2**20
    monkeypatch.setenv(EMBEDDED_ENV, str(copy))
    model, _ = load_model("minilm", 2)
    weight, ref = model.bert.encoder.layer[0].attention.self.query.weight, reference.bert.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == torch.float32  # loaded back as fp32 for training
    assert torch.equal(weight, ref.half().float())


SMALL = {"task": "rte", "max_train_samples": 32, "max_eval_samples": 16, "batch_size": 8, "eval_batch_size": 16,
         "max_length": 48, "progress": False, "num_threads": 1, "max_steps": 2, "eval_steps": 2}


def test_training_warns_where_bf16_would_be_emulated(tiny_run, tiny_model_dir, interrupt_after, avx2_cpu, monkeypatch,
                                                    capsys):
    """An AVX2-only CPU trains 30x slower in bf16 than in fp32: say so once, by what asked for bf16."""
    import warnings

    from lorafit.bench import env
    from lorafit.cli import main
    from lorafit.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("error", LorafitWarning)  # auto picks fp32 here: nothing to warn about
        assert train(tiny_run("auto", model=str(tiny_model_dir), max_steps=1))["precision"] == "fp32"
    common = {"model": str(tiny_model_dir), "max_steps": 4, "save_steps": 2, "eval_steps": 4}
    args = ["train", "--model", str(tiny_model_dir), "--task", "rte", "--max-train-samples", "32", "--max-eval-samples", "8",
            "--max-steps", "1", "--no-progress", "--allocator", "system", "--precision", "bf16"]
    assert main([*args, "--output-dir", str(tiny_run("cli").output_dir)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lorafit: warning: precision bf16 (the flag or the config): bf16 on this CPU (it has "
                          "neither AMX nor AVX-512 BF16) is emulated") and err.count("\n") == 1
    with monkeypatch.context() as amx:  # a run started in bf16 on a machine with AMX, resumed here
        amx.setattr(env, "cpu_flags", lambda: {f: f == "amx_bf16" for f in env.MATRIX_FLAGS})
        with interrupt_after(2), pytest.raises(KeyboardInterrupt):
            train(tiny_run("moved", **common))
    with pytest.warns(LorafitWarning, match=r"^the run resumes in bf16, as it started: bf16 on this CPU"):
        assert train(tiny_run("moved", resume=True, **common))["precision"] == "bf16"


def test_bf16_lora_run_keeps_the_adapter_fp32_and_records_its_speed_settings(tmp_path):
    from safetensors.torch import load_file

    from lorafit.train import train

    summary = train(make_config(**SMALL, precision="bf16", output_dir=str(tmp_path / "run")))
    assert summary["precision"] == "bf16" and summary["compile_seconds"] == 0
    assert summary["speed"]["frozen_bf16"] is True and summary["speed"]["fused_optimizer"] is True
    assert summary["speed"]["fast_dropout"] is False
    assert summary["speed"]["reuse_memory"] is False  # opt-in
    assert summary["examples"] == 16 and summary["tokens"] > 16
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}


@pytest.mark.slow
def test_compiled_run_pads_to_buckets_and_reports_compile_time(tmp_path):
    from lorafit.train import train

    summary = train(make_config(**SMALL, precision="bf16", compile=True, length_buckets=[48],
                                output_dir=str(tmp_path / "run")))
    assert summary["speed"]["compile"] is True and summary["speed"]["length_buckets"] == [48]
    assert 0 < summary["compile_seconds"] <= summary["train_seconds"]
    # Its speed is the compiled step's (the second of max_steps 2), not diluted by the compiling one.
    assert summary["examples_per_second"] > summary["examples"] / summary["train_seconds"]
    assert summary["best_metric"] is not None
