"""Reaching into a PEFT model from the parity tests: its LoRA layers, its head copies, and giving it
exactly lorafit's weights."""

from __future__ import annotations

import torch
from torch import nn

from lorafit.lora import head_module_names, lora_layers


def peft_module(peft_model, name: str) -> nn.Module:
    """The module called ``name`` in the model PEFT wraps (a LoRA layer or a head wrapper)."""
    return peft_model.base_model.model.get_submodule(name)


def peft_head(peft_model, name: str) -> nn.Module:
    """The trained copy of a head module inside PEFT's ModulesToSaveWrapper."""
    return peft_module(peft_model, name).modules_to_save["default"]


def copy_into_peft(ours: nn.Module, theirs) -> dict[str, nn.Module]:
    """Give PEFT's model exactly lorafit's LoRA factors, DoRA magnitudes and head weights;
    returns lorafit's LoRA layers by name."""
    layers = dict(lora_layers(ours))
    with torch.no_grad():
        for name, layer in layers.items():
            module = peft_module(theirs, name)
            module.lora_A["default"].weight.copy_(layer.lora_A.weight)
            module.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.lora_magnitude_vector is not None:
                module.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
        for head in head_module_names(ours):
            peft_head(theirs, head).load_state_dict(ours.get_submodule(head).state_dict())
    return layers
