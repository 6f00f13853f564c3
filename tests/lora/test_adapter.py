"""Adapters on disk: lorafit's own round trip, the files it writes, and one clear error for
each kind of bad adapter directory, with the model left as it was."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError
from lorafit.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_config_of,
    lora_layers,
    merge_lora,
    read_adapter_config,
    read_adapter_metadata,
    save_adapter,
)
from lorafit.lora.adapter import adapter_state_dict, load_lora_weights

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
METADATA = "lorafit_adapter.json"


@pytest.fixture
def trained(tiny_model, randomize):
    """``trained(arch, **overrides)``: an adapted tiny model with non-zero LoRA and a changed head."""

    def make(arch: str = "bert", **overrides):
        model = inject_lora(tiny_model(arch, **overrides), LoRAConfig(r=4, alpha=8))
        randomize(model, head=True)
        return model

    return make


@pytest.fixture
def saved(trained, tmp_path):
    """A BERT adapter directory saved by lorafit."""
    directory = tmp_path / "adapter"
    save_adapter(trained("bert"), directory, metadata={"task": "sst2"})
    return directory


def test_round_trip_restores_the_function(trained, tiny_model, arch, logits_of, tmp_path):
    model = trained(arch)
    expected = logits_of(model)
    save_adapter(model, tmp_path / "a", metadata={"task": "rte", "labels": ["entailment", "not_entailment"]})

    fresh = tiny_model(arch)
    assert (logits_of(fresh) - expected).abs().max() > 1e-3
    assert load_adapter(fresh, tmp_path / "a") is fresh
    assert torch.equal(logits_of(fresh), expected)
    loaded = adapter_state_dict(fresh)
    original = adapter_state_dict(model)
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_files_and_key_names(trained, tmp_path):
    model = trained("roberta")
    directory = save_adapter(model, tmp_path / "out" / "step-000010", metadata={"task": "sst2"})
    assert sorted(os.listdir(directory)) == sorted([CONFIG, WEIGHTS, METADATA])  # no temp files left
    state = load_file(directory / WEIGHTS)
    expected = {
        f"base_model.model.roberta.encoder.layer.{i}.attention.self.{t}.lora_{ab}.weight"
        for i in range(2)
        for t in ("query", "value")
        for ab in "AB"
    } | {
        "base_model.model.classifier.dense.weight",
        "base_model.model.classifier.dense.bias",
        "base_model.model.classifier.out_proj.weight",
        "base_model.model.classifier.out_proj.bias",
    }
    assert set(state) == expected
    query = "base_model.model.roberta.encoder.layer.0.attention.self.query"
    assert state[f"{query}.lora_A.weight"].shape == (4, 32)
    assert state[f"{query}.lora_B.weight"].shape == (32, 4)
    assert torch.equal(state["base_model.model.classifier.out_proj.weight"], model.classifier.out_proj.weight)

    config = json.loads((directory / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert config["use_dora"] is False and config["use_rslora"] is False

    cfg = read_adapter_config(directory)
    assert (cfg.r, cfg.alpha) == (4, 8)
    assert (cfg.target_modules, cfg.modules_to_save) == (["query", "value"], ["classifier"])
    metadata = read_adapter_metadata(directory)
    assert metadata["task"] == "sst2"
    assert metadata["base_model"]["model_type"] == "roberta"
    assert metadata["base_model"]["hidden_size"] == 32
    assert len(metadata["base_model"]["weight_sample"]) == 16


def test_deberta_pooler_is_saved_and_loaded(trained, tiny_model, tmp_path):
    model = trained("deberta-v2")
    save_adapter(model, tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    assert {"base_model.model.pooler.dense.weight", "base_model.model.pooler.dense.bias"} <= set(state)
    fresh = load_adapter(tiny_model("deberta-v2"), tmp_path)
    assert torch.equal(fresh.pooler.dense.weight, model.pooler.dense.weight)
    assert fresh.pooler.dense.weight.requires_grad  # loaded adapters can be trained further


def test_rslora_round_trip(tiny_model, randomize, logits_of, tmp_path):
    model = inject_lora(tiny_model("bert"), LoRAConfig(r=4, alpha=8, use_rslora=True))
    randomize(model, head=True)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["use_rslora"] is True
    fresh = load_adapter(tiny_model("bert"), tmp_path)
    assert all(layer.scaling == 4.0 for _, layer in lora_layers(fresh))
    assert torch.equal(logits_of(fresh), logits_of(model))


def test_saving_a_merged_model_saves_the_same_adapter(trained, tiny_model, logits_of, tmp_path):
    model = trained("bert")
    expected = logits_of(model)
    merge_lora(model)
    save_adapter(model, tmp_path)  # the base fingerprint is taken from the unmerged weight
    fresh = load_adapter(tiny_model("bert"), tmp_path)
    assert (logits_of(fresh) - expected).abs().max() <= 1e-5


def test_saving_without_lora_is_refused(tiny_model, tmp_path):
    with pytest.raises(LorafitError, match="inject_lora"):
        save_adapter(tiny_model("bert"), tmp_path)
    assert not any(tmp_path.iterdir())


# --- bad adapter directories -------------------------------------------------------------------


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_untouched(model, snapshot, base_logits, logits_of):
    state, flags = snapshot
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert lora_config_of(model) is None and not hasattr(model, "lora_state")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(logits_of(model), base_logits)


def _edit_config(directory, **changes):
    path = directory / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _drop_config_field(directory, field):
    path = directory / CONFIG
    config = json.loads(path.read_text())
    del config[field]
    path.write_text(json.dumps(config))


def _edit_weights(directory, edit):
    path = directory / WEIGHTS
    state = load_file(path)
    edit(state)
    save_file(state, path)


LORA_A0 = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


def _drop_key(state):
    del state["base_model.model.classifier.bias"]


def _add_key(state):
    state["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)


def _wrong_shape(state):
    state[LORA_A0] = torch.zeros(5, 32)


BREAKAGES = {
    "config missing": (lambda d: (d / CONFIG).unlink(), [CONFIG, "not found"]),
    "config not json": (lambda d: (d / CONFIG).write_text("{ not json"), [CONFIG, "not valid JSON"]),
    "config not a dict": (lambda d: (d / CONFIG).write_text("[1, 2]"), [CONFIG, "'peft_type'"]),
    "not lora": (lambda d: _edit_config(d, peft_type="IA3"), [CONFIG, "'peft_type'", "IA3"]),
    "dora": (lambda d: _edit_config(d, use_dora=True), [CONFIG, "'use_dora'", "not supported"]),
    "rank pattern": (lambda d: _edit_config(d, rank_pattern={"query": 8}), [CONFIG, "'rank_pattern'"]),
    "lora bias": (lambda d: _edit_config(d, bias="all"), [CONFIG, "'bias'"]),
    "no r": (lambda d: _drop_config_field(d, "r"), [CONFIG, "missing field 'r'"]),
    "bad r": (lambda d: _edit_config(d, r=0), [CONFIG, "'r'"]),
    "weights missing": (lambda d: (d / WEIGHTS).unlink(), [WEIGHTS, "not found"]),
    "weights corrupt": (
        lambda d: (d / WEIGHTS).write_bytes(random.Random(0).randbytes(4096)),
        [WEIGHTS, "not a readable safetensors"],
    ),
    "weights truncated": (
        lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:200]),
        [WEIGHTS, "not a readable safetensors"],
    ),
    "missing key": (lambda d: _edit_weights(d, _drop_key), [WEIGHTS, "missing keys", "classifier.bias"]),
    "unexpected key": (
        lambda d: _edit_weights(d, _add_key),
        [WEIGHTS, "unexpected keys", "pooler.dense.weight"],
    ),
    "wrong shape": (lambda d: _edit_weights(d, _wrong_shape), [WEIGHTS, LORA_A0, "(5, 32)", "(4, 32)"]),
    "rank differs from weights": (lambda d: _edit_config(d, r=5), [WEIGHTS, "(4, 32)", "(5, 32)"]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_bad_adapter_is_one_clear_error_and_loads_nothing(breakage, saved, tiny_model, logits_of):
    break_it, fragments = BREAKAGES[breakage]
    break_it(saved)
    model = tiny_model("bert")
    base_logits = logits_of(model)
    snapshot = _snapshot(model)
    with pytest.raises(LorafitError) as info:
        load_adapter(model, saved)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    _assert_untouched(model, snapshot, base_logits, logits_of)


def test_missing_directory(tiny_model, tmp_path):
    with pytest.raises(LorafitError, match="adapter directory not found") as info:
        load_adapter(tiny_model("bert"), tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_legacy_bin_gets_a_hint(saved, tiny_model):
    (saved / WEIGHTS).rename(saved / "adapter_model.bin")
    with pytest.raises(LorafitError, match="adapter_model.bin"):
        load_adapter(tiny_model("bert"), saved)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"hidden_size": 48}, ["different base model", "hidden_size=32", "48"]),
        ({"num_hidden_layers": 3}, ["different base model", "num_hidden_layers=2", "3"]),
        ({"seed": 1}, ["different base model", "pretrained weights differ"]),
    ],
)
def test_different_base_model_is_refused(overrides, fragments, saved, tiny_model, logits_of):
    model = tiny_model("bert", **overrides)
    base_logits = logits_of(model)
    snapshot = _snapshot(model)
    with pytest.raises(LorafitError) as info:
        load_adapter(model, saved)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(saved) in str(info.value)
    _assert_untouched(model, snapshot, base_logits, logits_of)


def test_same_model_in_lower_precision_is_accepted(saved, tiny_model):
    # The fingerprint is compared with a tolerance: a bf16 copy of the same base still matches.
    model = tiny_model("bert").to(torch.bfloat16)
    load_adapter(model, saved)
    assert sum(1 for _ in lora_layers(model)) == 4


def test_a_good_adapter_loads_after_a_failed_one(saved, trained, tiny_model, logits_of, tmp_path):
    bad = tmp_path / "bad"
    save_adapter(trained("bert"), bad)
    _edit_weights(bad, _drop_key)
    model = tiny_model("bert")
    with pytest.raises(LorafitError):
        load_adapter(model, bad)
    load_adapter(model, saved)
    expected = load_adapter(tiny_model("bert"), saved)
    assert torch.equal(logits_of(model), logits_of(expected))


def test_loading_into_an_adapted_model_is_refused(saved, tiny_model):
    model = load_adapter(tiny_model("bert"), saved)
    with pytest.raises(LorafitError, match="already has LoRA layers"):
        load_adapter(model, saved)


# --- starting from another task's adapter (the paper's MNLI -> MRPC/RTE/STS-B) ----------------


def test_lora_weights_carry_over_but_the_head_starts_fresh(trained, tiny_model, tmp_path):
    mnli = trained("roberta", num_labels=3)
    save_adapter(mnli, tmp_path)
    rte = inject_lora(tiny_model("roberta", seed=0), LoRAConfig(r=4, alpha=8))
    head_before = {k: v.clone() for k, v in rte.classifier.state_dict().items()}
    load_lora_weights(rte, tmp_path)
    source = dict(lora_layers(mnli))
    for name, layer in lora_layers(rte):
        assert torch.equal(layer.lora_A.weight, source[name].lora_A.weight)
        assert torch.equal(layer.lora_B.weight, source[name].lora_B.weight)
    assert all(torch.equal(v, head_before[k]) for k, v in rte.classifier.state_dict().items())
    assert rte.classifier.out_proj.weight.shape == (2, 32)  # 2 labels here, 3 in the source


def test_lora_weights_of_another_rank_are_refused(trained, tiny_model, tmp_path):
    save_adapter(trained("bert"), tmp_path)
    model = inject_lora(tiny_model("bert"), LoRAConfig(r=8, alpha=8))
    before = {n: layer.lora_A.weight.clone() for n, layer in lora_layers(model)}
    with pytest.raises(LorafitError, match=r"has shape \(4, 32\), the model expects \(8, 32\)"):
        load_lora_weights(model, tmp_path)
    assert all(torch.equal(layer.lora_A.weight, before[n]) for n, layer in lora_layers(model))


def test_lora_weights_for_other_targets_are_refused(trained, tiny_model, tmp_path):
    save_adapter(trained("bert"), tmp_path)
    model = inject_lora(tiny_model("bert"), LoRAConfig(r=4, alpha=8, target_modules=["key"]))
    with pytest.raises(LorafitError, match="other target modules"):
        load_lora_weights(model, tmp_path)


def test_the_base_model_name_is_the_one_given(trained, tmp_path) -> None:
    model = trained("bert")
    save_adapter(model, tmp_path / "given", base_model="org/tiny-bert")
    assert json.loads((tmp_path / "given" / CONFIG).read_text())["base_model_name_or_path"] == "org/tiny-bert"
    model.config._name_or_path = "some/folder"
    save_adapter(model, tmp_path / "default")  # without a name: the model config's own
    assert json.loads((tmp_path / "default" / CONFIG).read_text())["base_model_name_or_path"] == "some/folder"
