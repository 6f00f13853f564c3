"""Finding and building encoders offline: the embedded MiniLM, local folders, the Hub's
offline failure, and models built from the shipped architecture configs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from lorafit.errors import LorafitError
from lorafit.models import (
    EMBEDDED_HUB_ID,
    SHIPPED_CONFIGS,
    build_from_config,
    display_name,
    embedded_model_path,
    load_model,
    load_tokenizer,
    resolve_model,
    shipped_config,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub: the offline flag set and an empty Hub cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("alias", ["minilm", "all-MiniLM-L6-v2", EMBEDDED_HUB_ID])
def test_embedded_model_aliases_resolve_to_its_folder(alias):
    location = Path(resolve_model(alias))
    assert location == embedded_model_path()
    assert (location / "config.json").is_file()
    assert (location / "model.safetensors").is_file()
    assert display_name(alias) == EMBEDDED_HUB_ID


def test_load_embedded_minilm(offline):
    model, new_modules = load_model("minilm", num_labels=2, label_names=["negative", "positive"])
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_hidden_layers == 6
    assert model.config.hidden_size == 384
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert new_modules == ["classifier"]
    # The encoder really holds the pretrained weights, not a random init.
    checkpoint = load_file(embedded_model_path() / "model.safetensors")
    key = next(k for k in checkpoint if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, checkpoint[key])


def test_regression_head_for_one_label(offline):
    model, new_modules = load_model("minilm", num_labels=1)
    assert model.config.problem_type == "regression"
    assert new_modules == ["classifier"]


def test_embedded_tokenizer_loads_offline(offline):
    tokenizer = load_tokenizer("minilm")
    ids = tokenizer("a tiny test")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LorafitError, match="no such folder") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(LorafitError, match="no-such-model"):
        load_model(str(missing), num_labels=2)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(LorafitError, match="config.json") as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_hub_id_offline_fails_fast_with_the_way_out(offline):
    start = time.monotonic()
    with pytest.raises(LorafitError) as info:
        load_model("roberta-base", num_labels=2)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "--model roberta-base" in message
    assert "--model minilm" in message
    assert resolve_model("roberta-base") == "roberta-base"  # a Hub id as such is not an error


def test_shipped_configs_are_complete():
    expected = {"roberta-base", "roberta-large", "deberta-v2-xlarge", "deberta-v2-xxlarge"}
    assert set(SHIPPED_CONFIGS) == expected
    for name in SHIPPED_CONFIGS:
        config = shipped_config(name)
        assert config["model_type"] in ("roberta", "deberta-v2")
        assert not any(k.startswith("_") for k in config)
    assert shipped_config("roberta-large")["hidden_size"] == 1024
    assert shipped_config("deberta-v2-xxlarge")["num_hidden_layers"] == 48


def test_unknown_shipped_config_lists_the_shipped_ones():
    with pytest.raises(LorafitError, match="roberta-base") as info:
        build_from_config("bert-base")
    assert "'bert-base'" in str(info.value)


def test_build_on_meta_allocates_nothing():
    model = build_from_config("roberta-large", num_labels=3)
    assert all(p.is_meta for p in model.parameters())
    assert model.config.num_labels == 3
    assert model.classifier.out_proj.out_features == 3


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("roberta-base", {}),
        # DeBERTa fixes the head size and the pooler width separately from hidden_size.
        ("deberta-v2-xlarge", {"attention_head_size": 8, "pooler_hidden_size": 32, "position_buckets": 8}),
    ],
)
def test_build_tiny_runnable_model_with_overrides(name, extra, tiny_model_config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: thread hand-offs would cost more than the work
    try:
        torch.manual_seed(0)
        model = build_from_config(name, device="cpu", **tiny_model_config, **extra).eval()
        assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
        assert not any(p.is_meta for p in model.parameters())
        with torch.no_grad():
            logits = model(input_ids=torch.randint(3, 99, (2, 7))).logits
    finally:
        torch.set_num_threads(threads)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_build_from_a_config_dict(tiny_model_config):
    model = build_from_config({"model_type": "bert", **tiny_model_config}, num_labels=5, device="cpu")
    assert isinstance(model, BertForSequenceClassification)
    assert model.classifier.out_features == 5
