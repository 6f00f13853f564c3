"""The memory plan's arithmetic, checked against real models built from the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.lora import LoRAConfig, count_parameters, inject_lora
from lorafit.memory_plan import GiB, activation_bytes, parameter_counts, plan, table
from lorafit.models import SHIPPED_CONFIGS, build_from_config, shipped_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_parameter_counts_equal_the_models_built_on_the_meta_device(name):
    model = build_from_config(name, num_labels=2)  # shapes only: no memory for 1.5B weights
    counts = parameter_counts(shipped_config(name))
    assert counts.total == sum(p.numel() for p in model.parameters())
    lora = LoRAConfig(r=8, alpha=16).resolved(model.config.model_type)
    inject_lora(model, lora)
    real = count_parameters(model)
    assert (counts.lora, counts.head) == (real.adapter, real.head)


def test_roberta_large_by_hand():
    # 24 layers x 2 projections x r=8 x (1024 in + 1024 out); head: 1024x1024 + 1024, 1024x2 + 2.
    counts = parameter_counts(shipped_config("roberta-large"))
    assert counts.lora == 24 * 2 * 8 * 2048 == 786_432
    assert counts.head == 1024 * 1024 + 1024 + 2 * 1024 + 2
    # One layer at batch 8, length 128: 8*128*(18*1024 + 4*4096) + 5*16*128*128*8 bytes.
    assert activation_bytes(shipped_config("roberta-large")) == 24 * (1024 * (18 * 1024 + 4 * 4096) + 5 * 16 * 128**2 * 8)


def test_sharding_divides_weights_gradients_and_optimizer_but_not_activations():
    ddp, fsdp = plan("deberta-v2-xxlarge", "full", "DDP", 8), plan("deberta-v2-xxlarge", "full", "FSDP", 8)
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] == pytest.approx(ddp[part] / 8)
    assert fsdp["activations"] == ddp["activations"]
    # Full fine-tuning of 1.57B fp32 weights with AdamW: 16 bytes each, about 23 GiB before activations.
    assert (ddp["weights"] + ddp["gradients"] + ddp["optimizer"]) / GiB == pytest.approx(1_566_913_538 * 16 / GiB)
    lora = plan("deberta-v2-xxlarge", "lora", "DDP", 1)
    assert lora["optimizer"] < 0.01 * ddp["optimizer"]


def test_docs_hold_the_generated_table():
    assert table() in (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
