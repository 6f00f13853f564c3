"""The fast path's pieces: precision choice, frozen bf16 weights, length buckets, the GPU choices.

The GPU-only choices (CUDA graphs, pinned copies) are decided by small functions that are
exercised here on the CPU, so a machine without CUDA can neither break nor skip them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lorafit import fastpath
from lorafit.config import make_config
from lorafit.data.batching import collate
from lorafit.errors import LorafitError
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


@pytest.mark.parametrize("p", [0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_drops_p_of_the_elements_unbiased(p, dtype):
    torch.manual_seed(0)
    y = fastpath.fast_dropout(torch.ones(400_003, dtype=dtype), p)  # not a multiple of 4
    dropped = (y == 0).float()
    # 400,003 Bernoulli(p) draws: 5 standard deviations are under 0.004.
    assert dropped.mean().item() == pytest.approx(p, abs=0.004)
    # Each of the four 16-bit words of a 64-bit draw decides its own element, each as often.
    for column in dropped[:400_000].view(-1, 4).mean(0):
        assert column.item() == pytest.approx(p, abs=0.008)
    keep = 1 - round(p * 65536) / 65536
    zero, scale = y.unique().tolist()
    assert zero == 0.0 and scale == pytest.approx(1 / keep, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert y.dtype == dtype and y.float().mean().item() == pytest.approx(1.0, abs=0.01)


def test_fast_dropout_mask_is_the_documented_function_of_one_draw():
    # The stream is part of a run's record: runs made with --fast-dropout repeat only while each
    # element's fate stays "its 16-bit SFC64 word >= threshold", seeded by one int64 draw.
    x = torch.randn(5, 7, 11)
    torch.manual_seed(7)
    y = fastpath.fast_dropout(x, 0.1)
    torch.manual_seed(7)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4).view(np.int16)[: x.numel()].astype(np.int64)
    keep = torch.from_numpy(words >= round(0.1 * 65536) - 32768).view(x.shape)
    assert torch.equal(y, torch.where(keep, x * (65536 / (65536 - round(0.1 * 65536))), 0.0))


def test_fast_dropout_draws_from_the_default_generator_and_backpropagates_through_its_mask():
    x = torch.randn(6, 7, requires_grad=True)
    torch.manual_seed(3)
    a = fastpath.fast_dropout(x, 0.5)
    b = fastpath.fast_dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(fastpath.fast_dropout(x, 0.5), a)  # a seed repeats it (and a resume restores it)
    assert not torch.equal(a, b)  # the generator moves on
    a.sum().backward()
    assert torch.equal(x.grad, torch.where(a != 0, torch.full_like(x, 2.0), 0.0))
    assert torch.equal(fastpath.fast_dropout(x, 1.0), torch.zeros_like(x))


def test_use_fast_dropout_swaps_every_dropout_and_changes_nothing_in_eval():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=37, vocab_size=99))
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["query", "value"]).resolved("bert"))
    before = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    ids = torch.randint(0, 99, (3, 11))
    model.eval()
    expected = model(input_ids=ids).logits
    assert fastpath.use_fast_dropout(model) == len(before)
    after = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {n: m.p for n, m in after.items()} == before  # the same places, the same p (SDPA reads .p)
    assert all(type(m) is fastpath.FastDropout for m in after.values())
    assert "bert.encoder.layer.0.attention.self.query.lora_dropout" in after
    assert model.config._attn_implementation == fastpath.FAST_ATTENTION  # attention's own dropout too
    assert torch.equal(model(input_ids=ids).logits, expected)
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    torch.manual_seed(1)
    assert torch.equal(model(input_ids=ids).logits, first)


def _tiny_encoder(kind: str) -> torch.nn.Module:
    import transformers

    config_class, model_class = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
        "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification),
    }[kind]
    torch.manual_seed(0)
    return model_class(config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    vocab_size=99, max_position_embeddings=64, pad_token_id=1))


def test_fast_attention_is_softmax_attention_with_the_fast_dropout_mask():
    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self.train()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False  # the second sequence has two padding tokens
    torch.manual_seed(7)
    out, _ = fastpath.fast_attention(layer, q, k, v, keep, scaling=0.3, dropout=0.25)
    torch.manual_seed(7)
    mask = fastpath.fast_dropout(torch.ones(2, 4, 5, 5), 0.25)  # the same draws: the same mask
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf")), dim=-1)
    expected = ((probs * mask) @ v).transpose(1, 2)
    assert out.shape == (2, 5, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, (probs @ v).transpose(1, 2))  # dropout did drop
    v2 = v.clone()
    v2[1, :, 3:] = 1e4  # the values of masked keys do not count
    torch.manual_seed(7)
    assert torch.equal(fastpath.fast_attention(layer, q, k, v2, keep, scaling=0.3, dropout=0.25)[0], out)


def test_the_boolean_mask_is_added_once_a_pass_and_gives_masked_fills_values_and_gradients_bit_for_bit():
    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self.train()
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False  # key padding, the only masking an encoder's batches have

    def attend(masked_fill: bool):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, 5, 8, requires_grad=True) for _ in range(3))
        torch.manual_seed(7)
        if masked_fill:  # the formulation the addend replaced
            scores = (q @ k.transpose(-1, -2)).float().mul_(0.3)
            scores = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
            out = (fastpath.fast_dropout(torch.softmax(scores, dim=-1), 0.25) @ v).transpose(1, 2).contiguous()
        else:
            out, _ = fastpath.fast_attention(layer, q, k, v, keep, scaling=0.3, dropout=0.25)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
        return out, q.grad, k.grad, v.grad

    for ours, reference in zip(attend(False), attend(True)):
        assert torch.equal(ours, reference)
    # A query row with every key masked gets uniform weights, as in eager attention, not NaN.
    none = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    out, _ = fastpath.fast_attention(layer, q, k, v, none, scaling=0.3, dropout=1e-9)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 4, 5, 8).transpose(1, 2))
    # One conversion for the mask every layer of a forward pass shares; a new mask gets its own.
    addend = fastpath._additive_mask(keep)
    assert fastpath._additive_mask(keep) is addend and addend.dtype == torch.float32
    assert torch.equal(addend == 0, keep)
    other = keep.clone()
    other[0, ..., 0] = False
    assert torch.equal(fastpath._additive_mask(other) == 0, other)


def test_fast_attention_is_sdpa_itself_outside_training_with_dropout():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, ..., 4:] = False
    for training, p in ((False, 0.0), (True, 0.0), (False, 0.1)):  # what SDPA is given, it gets
        layer.train(training)
        torch.manual_seed(3)
        out, _ = fastpath.fast_attention(layer, q, k, v, keep, scaling=0.3, dropout=p)
        torch.manual_seed(3)
        assert torch.equal(out, sdpa_attention_forward(layer, q, k, v, keep, scaling=0.3, dropout=p)[0])


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2"])
def test_fast_dropout_trains_every_architecture_and_keeps_its_eval_logits(kind, tmp_path):
    model = _tiny_encoder(kind)
    ids = torch.randint(2, 99, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    fastpath.use_fast_dropout(model)
    # DeBERTa computes its own attention (its dropout is one of the swapped modules).
    switched = model.config._attn_implementation == fastpath.FAST_ATTENTION
    assert switched == (kind != "deberta-v2")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.save_pretrained(tmp_path)  # the registered name is not saved: it loads anywhere
    assert fastpath.FAST_ATTENTION not in (tmp_path / "config.json").read_text()


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


# Minor page faults of allocating, touching and freeing an 8 MiB tensor, first as glibc does by
# default, then after reuse_freed_memory(); in a fresh process, as the setting is process wide.
_FAULTS = """
import resource, torch
from lorafit import fastpath

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(2 * 1024 * 1024).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def steady():  # the best of a few rounds: the heap may take a round or two to grow
    return min(faults() for _ in range(4))

default = steady()
applied = fastpath.reuse_freed_memory()
print(default, applied, steady())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_reuse_freed_memory_stops_each_step_faulting_its_tensors_in_again():
    # glibc raises its mmap threshold by itself after a block is freed, at moments that vary
    # from run to run; the environment variable pins it at glibc's starting 128 KiB, so the
    # baseline is the same every time: each 8 MiB tensor a fresh mmap of 2,048 zeroed pages.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True, env=env).stdout
    default, applied, reused = out.split()
    assert applied == "True"
    assert int(default) > 5 * 2000 and int(reused) < 200, out


SMALL = {"task": "rte", "max_train_samples": 32, "max_eval_samples": 16, "batch_size": 8, "eval_batch_size": 16,
         "max_length": 48, "progress": False, "num_threads": 1, "max_steps": 2, "eval_steps": 2}


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
