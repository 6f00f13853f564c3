"""The LoRA variants in training: LoRA+'s optimizer groups, and DoRA / PiSSA runs end to end (train
a few steps, save, reload onto the original base, evaluate), on a tiny random BERT with MiniLM's
tokenizer, so that real runs take a second."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.config import make_config
from lorafit.data import get_task
from lorafit.errors import LorafitError
from lorafit.inference import evaluate_trained
from lorafit.lora import lora_layers
from lorafit.train import build_model, linear_schedule, make_optimizer, train

TINY = {"task": "rte", "max_train_samples": 48, "max_eval_samples": 24, "batch_size": 8, "eval_batch_size": 32,
        "max_length": 64, "progress": False, "num_threads": 1}
LAYERS = 4  # 2 layers x (query, value)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 random BERT saved as a local model folder, with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorafit.models import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny(tmp_path, tiny_bert):
    def make(name="run", **changes):
        return make_config(**{**TINY, "model": tiny_bert, "output_dir": str(tmp_path / name), **changes})

    return make


def test_loraplus_gives_b_the_ratio_and_keeps_the_weight_decay_split(tiny):
    cfg = tiny(loraplus_lr_ratio=16, learning_rate=1e-4, weight_decay=0.1, use_dora=True)
    model = build_model(cfg, get_task("rte"))
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain, b = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert b == {f"{n}.lora_B.weight" for n, _ in lora_layers(model)} and len(b) == LAYERS
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-4, 16e-4])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]
    # A, the DoRA magnitudes and the head stay at the base rate; biases keep no weight decay.
    assert {f"{n}.lora_A.weight" for n, _ in lora_layers(model)} <= decay
    assert {f"{n}.lora_magnitude_vector" for n, _ in lora_layers(model)} <= decay
    assert "classifier.weight" in decay and "classifier.bias" in plain
    assert decay | plain | b == {n for n, p in model.named_parameters() if p.requires_grad}
    sched = linear_schedule(opt, warmup=2, total=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[2]["lr"] == pytest.approx(16 * opt.param_groups[0]["lr"])  # one schedule for all


def test_without_loraplus_there_are_two_groups(tiny):
    cfg = tiny()
    opt = make_optimizer(build_model(cfg, get_task("rte")), cfg)
    assert len(opt.param_groups) == 2


def test_head_learning_rate_gives_the_head_its_own_groups(tiny):
    cfg = tiny(head_learning_rate=2e-5, learning_rate=1e-3, weight_decay=0.1, modules_to_save=["classifier", "pooler"])
    model = build_model(cfg, get_task("rte"))
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain, head, head_plain = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 2e-5, 2e-5])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert decay == {f"{n}.lora_{m}.weight" for n, _ in lora_layers(model) for m in "AB"} and not plain
    assert head == {"classifier.weight", "bert.pooler.dense.weight"}
    assert head_plain == {"classifier.bias", "bert.pooler.dense.bias"}
    sched = linear_schedule(opt, warmup=2, total=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[2]["lr"] == pytest.approx(opt.param_groups[0]["lr"] * 2e-5 / 1e-3)


def test_head_learning_rate_equal_to_the_rate_trains_bit_identically(tmp_path, tiny):
    common = {"max_steps": 4, "eval_steps": 2, "learning_rate": 1e-3, "modules_to_save": ["classifier", "pooler"]}
    train(tiny("plain", **common))
    train(tiny("same", head_learning_rate=1e-3, **common))
    train(tiny("lower", head_learning_rate=1e-5, **common))
    a, b, c = (load_file(tmp_path / r / "checkpoint" / "trainable.safetensors") for r in ("plain", "same", "lower"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_loraplus_ratio_1_trains_bit_identically_to_lora(tmp_path, tiny):
    common = {"max_steps": 4, "eval_steps": 2, "lora_dropout": 0.1, "learning_rate": 1e-3}
    train(tiny("lora", **common))
    train(tiny("ratio1", loraplus_lr_ratio=1, **common))
    train(tiny("ratio16", loraplus_lr_ratio=16, **common))
    a = load_file(tmp_path / "lora" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "ratio1" / "checkpoint" / "trainable.safetensors")
    c = load_file(tmp_path / "ratio16" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "train_seconds"}
    lines = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("lora", "ratio1")]
    assert [strip(x) for x in lines[0]] == [strip(x) for x in lines[1]]
    # The ratio reaches the B matrices: at 16 they move further than at 1.
    b_keys = [k for k in a if k.endswith("lora_B.weight")]
    assert sum(c[k].abs().sum() for k in b_keys) > 2 * sum(a[k].abs().sum() for k in b_keys)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"init_lora_weights": "pissa"},
                                     {"init_lora_weights": "gaussian", "use_rslora": True}],
                         ids=["dora", "pissa", "gaussian-rslora"])
def test_variant_run_reloads_onto_the_original_base(tmp_path, tiny, variant):
    summary = train(tiny(max_steps=3, eval_steps=3, learning_rate=1e-3, **variant))
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] == variant.get("use_dora", False)
    assert adapter["init_lora_weights"] == variant.get("init_lora_weights", True)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in saved) == ("use_dora" in variant)
    if "use_dora" in variant:  # the magnitudes are trained and counted with the adapter
        assert summary["trainable_parameters"]["adapter"] == LAYERS * (8 * (32 + 32) + 32)
    assert summary["best_metric"] is not None
    for merged in (True, False):
        metrics = evaluate_trained(tmp_path / "run", merged=merged, max_eval_samples=24)
        assert metrics["accuracy"] == pytest.approx(summary["best_metric"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"init_lora_weights": "olora"}, "--init-lora-weights must be one of 'default', 'gaussian', 'pissa'"),
    ({"loraplus_lr_ratio": 0}, "--loraplus-lr-ratio must be > 0"),
    ({"init_lora_weights": "pissa", "init_adapter": "runs/x/adapter"}, "--init-adapter replaces"),
])
def test_bad_variant_settings_are_clear_errors(changes, message):
    with pytest.raises(LorafitError, match=message):
        make_config(**changes)


def test_variant_flags_come_from_the_config(capsys):
    assert main(["train", "--help"]) == 0  # main returns argparse's exit status
    text = capsys.readouterr().out
    for flag in ("--use-dora", "--init-lora-weights {default,gaussian,pissa}", "--loraplus-lr-ratio"):
        assert flag in text
    assert main(["train", "--init-lora-weights", "pissa", "--init-adapter", "x", "--output-dir", "unused"]) == 2
    assert "--init-adapter replaces" in capsys.readouterr().err
