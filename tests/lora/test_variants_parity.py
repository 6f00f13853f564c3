"""DoRA and PiSSA against PEFT as the oracle: the same tiny model adapted by lorafit and by PEFT
computes the same logits and gradients, adapters cross between the libraries both ways, and a
merged or exported model computes what the unmerged one does."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft_helpers import copy_into_peft, peft_module
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lorafit.lora import (
    LoRAConfig,
    head_module_names,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:PiSSA changes the base weights:UserWarning"),
]

TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"]}
HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "deberta-v2": ["classifier", "pooler"]}
VARIANTS = {
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa+dora": {"use_dora": True, "init_lora_weights": "pissa"},
}
TOL = 1e-5


def _ours(model, variant: str, dropout: float = 0.0):
    return inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, **VARIANTS[variant]))


def _theirs(model, arch: str, variant: str, dropout: float = 0.0):
    options = dict(VARIANTS[variant])
    options["init_lora_weights"] = options.get("init_lora_weights", True)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=dropout,
                        target_modules=list(TARGETS[arch]), modules_to_save=list(HEADS[arch]), **options)
    return get_peft_model(model, config)


def _perturb(ours, seed: int = 7) -> None:
    """Trained-looking adapter: random changes to A, B, the magnitudes and the head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            for name in layer.adapter_params():
                p = layer.get_parameter(name)
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for head in head_module_names(ours):
            for p in ours.get_submodule(head).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_initial_state_matches_peft_and_keeps_the_base_function(tiny_model, arch, variant, logits_of):
    base = logits_of(tiny_model(arch))
    ours = _ours(tiny_model(arch), variant)
    theirs = _theirs(tiny_model(arch), arch, variant)
    for name, layer in lora_layers(ours):
        module = peft_module(theirs, name)
        # PiSSA: the same factors from the SVD and the same residual base weight; DoRA: m = ||W0||.
        assert _max_diff(layer.base_layer.weight, module.base_layer.weight) <= TOL
        if "pissa" in variant:
            assert _max_diff(layer.lora_A.weight, module.lora_A["default"].weight) <= TOL
            assert _max_diff(layer.lora_B.weight, module.lora_B["default"].weight) <= TOL
            assert layer.lora_B.weight.abs().max() > 0.1  # not LoRA's zero start
        if "dora" in variant:
            magnitude = module.lora_magnitude_vector["default"].weight
            assert _max_diff(layer.lora_magnitude_vector, magnitude) <= TOL
    assert _max_diff(logits_of(ours), base) <= TOL  # every variant starts at the pretrained model
    assert _max_diff(logits_of(theirs), base) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["eval", "train-dropout"])
def test_logits_and_gradients_match_peft(tiny_model, arch, batch, variant, dropout):
    ours = _ours(tiny_model(arch), variant, dropout)
    theirs = _theirs(tiny_model(arch), arch, variant, dropout)
    _perturb(ours)
    layers = copy_into_peft(ours, theirs)
    if dropout:  # PEFT applies DoRA's rescaling to the dropped-out input too: the same random draws
        ours.train()
        theirs.train()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    torch.manual_seed(3)
    out_ours = ours(**inputs)
    torch.manual_seed(3)
    out_theirs = theirs(**inputs)
    assert _max_diff(out_ours.logits, out_theirs.logits) <= TOL
    out_ours.loss.backward()
    out_theirs.loss.backward()

    for name, layer in layers.items():
        module = peft_module(theirs, name)
        pairs = [(layer.lora_A.weight, module.lora_A["default"].weight),
                 (layer.lora_B.weight, module.lora_B["default"].weight)]
        if layer.lora_magnitude_vector is not None:
            pairs.append((layer.lora_magnitude_vector, module.lora_magnitude_vector["default"].weight))
        for mine, peft_param in pairs:
            assert mine.grad is not None and mine.grad.abs().max() > 0
            assert _max_diff(mine.grad, peft_param.grad) <= TOL, name
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_ours == n_theirs


def test_dora_norm_gets_no_gradient(tiny_model):
    """DoRA section 4.3: with the norm detached, B's gradient is m / ||.|| times LoRA's."""
    model = _ours(tiny_model("bert"), "dora")
    layer = dict(lora_layers(model))["bert.encoder.layer.0.attention.self.query"]
    _perturb(model)
    x = torch.randn(5, 32)
    layer(x).sum().backward()
    with torch.no_grad():
        norm = torch.linalg.norm(layer.base_layer.weight + layer.delta_weight(), dim=1)
        scale = layer.lora_magnitude_vector / norm
        # d/dB of sum(scale * s * B A x) with scale held constant
        expected = layer.scaling * scale[:, None] * (x @ layer.lora_A.weight.T).sum(0)[None, :]
    assert _max_diff(layer.lora_B.weight.grad, expected) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lorafit_adapter_loads_in_peft(tiny_model, arch, variant, logits_of, tmp_path):
    ours = _ours(tiny_model(arch), variant)
    _perturb(ours)
    expected = logits_of(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] == ("dora" in variant)
    assert config["init_lora_weights"] == ("pissa" if "pissa" in variant else True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == (4 if "dora" in variant else 0)

    fresh = tiny_model(arch)  # the original base: PEFT repeats PiSSA's SVD on it
    assert _max_diff(logits_of(fresh), expected) > 1e-3
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert _max_diff(logits_of(loaded), expected) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_lorafit(tiny_model, arch, variant, logits_of, tmp_path):
    theirs = _theirs(tiny_model(arch), arch, variant)
    ours = _ours(tiny_model(arch), variant)
    _perturb(ours)
    copy_into_peft(ours, theirs)
    theirs.eval()
    expected = logits_of(theirs)
    theirs.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(load_file(
        save_adapter(ours, tmp_path / "lorafit") / "adapter_model.safetensors"))

    fresh = tiny_model(arch)
    load_adapter(fresh, tmp_path)
    assert _max_diff(logits_of(fresh), expected) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_unmerged_and_exported_agree(tiny_model, arch, variant, logits_of, tmp_path):
    ours = _ours(tiny_model(arch), variant)
    theirs = _theirs(tiny_model(arch), arch, variant)
    _perturb(ours)
    names = list(copy_into_peft(ours, theirs))
    unmerged = logits_of(ours)
    before = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(ours)}
    merge_lora(ours)
    merge_lora(ours)  # idempotent
    merged = logits_of(ours)
    assert _max_diff(merged, unmerged) <= TOL
    assert _max_diff(merged, logits_of(tiny_model(arch))) > 1e-3
    unmerge_lora(ours)
    for name, layer in lora_layers(ours):
        assert _max_diff(layer.base_layer.weight, before[name]) <= 1e-6
    assert _max_diff(logits_of(ours), unmerged) <= TOL

    plain = merge_and_unload(ours)
    peft_plain = theirs.merge_and_unload()
    for name in names:
        assert _max_diff(plain.get_submodule(name).weight, peft_plain.get_submodule(name).weight) <= TOL
    plain.save_pretrained(tmp_path)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert _max_diff(logits_of(exported), unmerged) <= TOL
