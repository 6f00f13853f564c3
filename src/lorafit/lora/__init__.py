"""The LoRA method, in plain PyTorch: the layer, injection, merging, packing for unmerged inference and
PEFT-format adapters."""

from lorafit.lora.adapter import load_adapter, read_adapter_config, read_adapter_metadata, save_adapter
from lorafit.lora.config import DEFAULT_HEAD_MODULES, DEFAULT_TARGET_MODULES, LoRAConfig, LoRAConfigError
from lorafit.lora.inject import (
    LoRAState,
    ParameterCount,
    count_parameters,
    find_target_modules,
    head_module_names,
    inject_lora,
    lora_config_of,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lorafit.lora.layer import LoRALinear
from lorafit.lora.packed import pack_lora, unpack_lora

__all__ = [
    "DEFAULT_HEAD_MODULES",
    "DEFAULT_TARGET_MODULES",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRALinear",
    "LoRAState",
    "ParameterCount",
    "count_parameters",
    "find_target_modules",
    "head_module_names",
    "inject_lora",
    "load_adapter",
    "lora_config_of",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "pack_lora",
    "read_adapter_config",
    "read_adapter_metadata",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
    "unpack_lora",
]
