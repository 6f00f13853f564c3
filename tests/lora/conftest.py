"""Tiny random encoders built from configs (no download), shared by the LoRA tests.

Every architecture lorafit has defaults for gets a 2-layer, hidden-32 model: big enough to have
the real module layout (BERT's ``classifier``, RoBERTa's ``classifier.dense``/``out_proj``,
DeBERTa-v2's fresh ``pooler``), small enough that a forward pass takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

ARCHS = ("bert", "roberta", "deberta-v2")


@dataclass(frozen=True)
class Layout:
    """Where a tiny model's encoder lives, what LoRA adapts by default and which modules make up
    the trained head: written out here, as the paper and PEFT have them, not read from lorafit."""

    encoder: str
    targets: tuple[str, ...]
    heads: tuple[str, ...]


LAYOUTS = {
    "bert": Layout("bert", ("query", "value"), ("classifier",)),
    "roberta": Layout("roberta", ("query", "value"), ("classifier",)),
    "deberta-v2": Layout("deberta", ("query_proj", "value_proj"), ("classifier", "pooler")),
}

_SHARED = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": 99,
    "max_position_embeddings": 64,
    "num_labels": 2,
    "initializer_range": 0.2,  # O(1) logits, so tolerances like 1e-5 are meaningful
}


def _build(arch: str, seed: int, overrides: dict) -> nn.Module:
    kwargs = {**_SHARED, **overrides}
    if arch == "bert":
        model_cls, config = BertForSequenceClassification, BertConfig(**kwargs)
    elif arch == "roberta":
        model_cls, config = RobertaForSequenceClassification, RobertaConfig(**kwargs)
    elif arch == "deberta-v2":
        deberta = {
            "pooler_hidden_size": kwargs["hidden_size"],
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 8,
        }
        model_cls, config = DebertaV2ForSequenceClassification, DebertaV2Config(**{**deberta, **kwargs})
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these tiny models on one thread: with busy cores, thread hand-offs cost far more than
    the arithmetic (a 2-layer forward takes ~1 ms on one thread, ~100 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: ``tiny_model(arch, seed=0, **config_overrides)``, in eval mode (dropout off).

    The same arch and seed give bit-identical weights, so two calls give a model and its twin.
    """

    def make(arch: str, seed: int = 0, **overrides) -> nn.Module:
        return _build(arch, seed, overrides)

    return make


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def layout(arch) -> Layout:
    """The layout of ``arch``'s tiny model (see :class:`Layout`)."""
    return LAYOUTS[arch]


@pytest.fixture
def layouts() -> dict[str, Layout]:
    return LAYOUTS


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three sequences of length 9, the last two padded (ids avoid the special ids 0-2)."""
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 99, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 1  # RoBERTa's pad id; masked out for the others
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1])}


def randomize_lora(model: nn.Module, std: float = 0.2, seed: int = 7, head: bool = False) -> None:
    """Give every LoRA layer a non-zero B (and a fresh A), so the adapter changes the output.

    With ``head=True`` the trained head modules get random changes too, as training would.
    """
    from lorafit.lora import head_module_names, lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * std)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
        if head:
            for name in head_module_names(model):
                for p in model.get_submodule(name).parameters():
                    p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def randomize() -> Callable[..., None]:
    """``randomize(model, std=0.2, seed=7, head=False)``: non-zero LoRA factors (and head changes)."""
    return randomize_lora


@pytest.fixture
def logits_of(batch) -> Callable[[nn.Module], torch.Tensor]:
    """``logits_of(model)``: the model's logits on ``batch``, without gradients."""

    def run(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return run
