"""LoRAConfig validates itself: each bad field is one LorafitError naming the field."""

from __future__ import annotations

import pytest

from lorafit.errors import LorafitError
from lorafit.lora import DEFAULT_HEAD_MODULES, DEFAULT_TARGET_MODULES, LoRAConfig


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"r": 0}, "'r'", "got 0"),
        ({"r": -2}, "'r'", "got -2"),
        ({"r": 1.5}, "'r'", "got 1.5"),
        ({"r": True}, "'r'", "got True"),
        ({"alpha": 0}, "'alpha'", "got 0"),
        ({"alpha": -1}, "'alpha'", "got -1"),
        ({"alpha": "16"}, "'alpha'", "got '16'"),
        ({"dropout": 1.0}, "'dropout'", "got 1.0"),
        ({"dropout": -0.1}, "'dropout'", "got -0.1"),
        ({"target_modules": []}, "'target_modules'", "got []"),
        ({"target_modules": ["query", ""]}, "'target_modules'", "got ['query', '']"),
        ({"target_modules": ""}, "'target_modules'", "empty string"),
        ({"target_modules": 3}, "'target_modules'", "got 3"),
    ],
)
def test_bad_field_is_named(kwargs, field, shown):
    with pytest.raises(LorafitError) as info:
        LoRAConfig(**kwargs)
    message = str(info.value)
    assert field in message
    assert shown in message


def test_valid_config_keeps_values():
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=("query", "key"), use_rslora=True)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora) == (4, 8, 0.1, True)
    assert cfg.target_modules == ["query", "key"]  # a tuple becomes a list
    assert cfg.to_dict()["target_modules"] == ["query", "key"]


@pytest.mark.parametrize(
    ("model_type", "targets", "heads"),
    [
        ("bert", ["query", "value"], ["classifier"]),
        ("roberta", ["query", "value"], ["classifier"]),
        ("deberta-v2", ["query_proj", "value_proj"], ["classifier", "pooler"]),
    ],
)
def test_resolved_defaults_per_architecture(model_type, targets, heads):
    cfg = LoRAConfig(r=4, alpha=8).resolved(model_type)
    assert cfg.target_modules == targets
    assert cfg.modules_to_save == heads
    assert list(DEFAULT_TARGET_MODULES[model_type]) == targets
    assert list(DEFAULT_HEAD_MODULES[model_type]) == heads
    assert (cfg.r, cfg.alpha) == (4, 8)


def test_user_choices_override_defaults():
    cfg = LoRAConfig(target_modules=["key"], modules_to_save=["classifier", "pooler"]).resolved("bert")
    assert cfg.target_modules == ["key"]
    assert cfg.modules_to_save == ["classifier", "pooler"]


def test_unknown_architecture_needs_explicit_targets():
    with pytest.raises(LorafitError, match="target_modules") as info:
        LoRAConfig().resolved("gpt2")
    assert "'gpt2'" in str(info.value)
    assert LoRAConfig(target_modules=["c_attn"]).resolved("gpt2").target_modules == ["c_attn"]
