"""PEFT as the oracle: the same tiny model adapted by lorafit and by PEFT computes the same
logits and gradients, and adapters cross between the two libraries in both directions."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft_helpers import copy_into_peft, peft_head, peft_module
from safetensors.torch import load_file

from lorafit.errors import LorafitError
from lorafit.lora import LoRAConfig, head_module_names, inject_lora, load_adapter, lora_layers, save_adapter
from lorafit.lora import merge_and_unload as lorafit_merge_and_unload

# PEFT and this transformers version disagree about a deprecated property; not lorafit's concern.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

def _lorafit(model, use_rslora=False):
    return inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, use_rslora=use_rslora))


def _peft(model, layout, use_rslora=False):
    # Fresh lists: PEFT extends modules_to_save in place (adding "classifier", "score").
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=list(layout.targets),
        modules_to_save=list(layout.heads),
        use_rslora=use_rslora,
    )
    return get_peft_model(model, config)


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_logits_and_gradients_match_peft(tiny_model, arch, layout, batch, randomize, use_rslora):
    ours = _lorafit(tiny_model(arch), use_rslora)
    theirs = _peft(tiny_model(arch), layout, use_rslora)
    randomize(ours, head=True)
    layers = copy_into_peft(ours, theirs)
    assert len(layers) == 4
    for name, layer in layers.items():
        assert peft_module(theirs, name).scaling["default"] == layer.scaling
    assert layers[next(iter(layers))].scaling == (4.0 if use_rslora else 2.0)

    out_ours, out_theirs = _forward(ours, batch), _forward(theirs, batch)
    assert (out_ours.logits - out_theirs.logits).abs().max() <= 1e-5
    out_ours.loss.backward()
    out_theirs.loss.backward()

    for name, layer in layers.items():
        module = peft_module(theirs, name)
        for ab in ("lora_A", "lora_B"):
            g_ours = getattr(layer, ab).weight.grad
            g_theirs = getattr(module, ab)["default"].weight.grad
            assert g_ours is not None and g_ours.abs().max() > 0
            assert (g_ours - g_theirs).abs().max() <= 1e-5, (name, ab)
    for head in head_module_names(ours):
        theirs_params = dict(peft_head(theirs, head).named_parameters())
        for pname, p in ours.get_submodule(head).named_parameters():
            assert p.grad is not None
            assert (p.grad - theirs_params[pname].grad).abs().max() <= 1e-5, (head, pname)
    # Both train exactly the same parameters.
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_ours == n_theirs


def test_merged_weights_match_peft(tiny_model, arch, layout, randomize):
    ours = _lorafit(tiny_model(arch))
    theirs = _peft(tiny_model(arch), layout)
    randomize(ours, head=True)
    names = list(dict(copy_into_peft(ours, theirs)))
    merged_ours = lorafit_merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    for name in names:
        w_ours = merged_ours.get_submodule(name).weight
        w_theirs = merged_theirs.get_submodule(name).weight
        assert (w_ours - w_theirs).abs().max() <= 1e-6


def test_lorafit_adapter_loads_in_peft(tiny_model, arch, layout, randomize, logits_of, tmp_path):
    ours = _lorafit(tiny_model(arch))
    randomize(ours, head=True)
    expected = logits_of(ours)
    save_adapter(ours, tmp_path)

    fresh = tiny_model(arch)
    assert (logits_of(fresh) - expected).abs().max() > 1e-3
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert isinstance(loaded, peft.PeftModelForSequenceClassification)
    assert (logits_of(loaded) - expected).abs().max() <= 1e-5

    config = PeftConfig.from_pretrained(tmp_path)
    assert config.peft_type == peft.PeftType.LORA
    assert config.task_type == "SEQ_CLS"
    assert (config.r, config.lora_alpha) == (4, 8)
    assert set(config.target_modules) == set(layout.targets)


def test_peft_adapter_loads_in_lorafit(tiny_model, arch, layout, randomize, logits_of, tmp_path):
    theirs = _peft(tiny_model(arch), layout)
    ours = _lorafit(tiny_model(arch))
    randomize(ours, head=True)
    copy_into_peft(ours, theirs)  # a PEFT model with non-zero B and a changed head
    theirs.eval()
    expected = logits_of(theirs)
    theirs.save_pretrained(tmp_path)

    fresh = tiny_model(arch)
    assert (logits_of(fresh) - expected).abs().max() > 1e-3
    load_adapter(fresh, tmp_path)
    assert (logits_of(fresh) - expected).abs().max() <= 1e-5
    assert sorted(head_module_names(fresh)) == sorted(layout.heads)


def test_saved_files_match_peft_key_for_key(tiny_model, arch, layout, tmp_path):
    ours = _lorafit(tiny_model(arch))
    theirs = _peft(tiny_model(arch), layout)
    save_adapter(ours, tmp_path / "lorafit")
    theirs.save_pretrained(tmp_path / "peft")
    ours_state = load_file(tmp_path / "lorafit" / "adapter_model.safetensors")
    theirs_state = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ours_state) == set(theirs_state)
    assert all(ours_state[k].shape == theirs_state[k].shape for k in ours_state)
    lora_key = f"base_model.model.{layout.encoder}.encoder.layer.0.attention.self.{layout.targets[0]}.lora_A.weight"
    head_key = "base_model.model.classifier." + ("out_proj.weight" if arch == "roberta" else "weight")
    assert {lora_key, head_key} <= set(ours_state)

    ours_config = json.loads((tmp_path / "lorafit" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    shared = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias")
    for key in shared:
        assert ours_config[key] == theirs_config[key], key


def test_peft_adapter_for_other_shapes_is_refused(tiny_model, layouts, logits_of, tmp_path):
    # PEFT writes no lorafit metadata, so the key/shape check is what catches the wrong base.
    _peft(tiny_model("bert"), layouts["bert"]).save_pretrained(tmp_path)
    model = tiny_model("bert", hidden_size=48)
    base = logits_of(model)
    with pytest.raises(LorafitError, match=r"adapter_model\.safetensors.*has shape \(4, 32\).*\(4, 48\)"):
        load_adapter(model, tmp_path)
    assert torch.equal(logits_of(model), base)
    assert not any(True for _ in lora_layers(model))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_evaluation_logits_equal_peft_bit_for_bit(tiny_model, arch, layout, randomize, logits_of, precision, use_rslora):
    # Evaluation without autograd takes LoRALinear's shorter path (a shared cast, the scale of 2 or
    # 4 folded into B): it must still compute exactly what PEFT computes.
    ours = _lorafit(tiny_model(arch), use_rslora)
    theirs = _peft(tiny_model(arch), layout, use_rslora)
    randomize(ours, head=True)
    copy_into_peft(ours, theirs)
    ours.eval()
    theirs.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        assert torch.equal(logits_of(ours), logits_of(theirs))
