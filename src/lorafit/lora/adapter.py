"""Adapters on disk, in PEFT's format.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's
key names (``base_model.model.<module>.lora_A.weight``; the head as
``base_model.model.classifier.weight``), so ``peft.PeftModel.from_pretrained`` loads what lorafit
writes and lorafit loads what PEFT writes. lorafit adds ``lorafit_adapter.json``: the task, the
label names and a fingerprint of the base model, so a different base model is caught on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lorafit.errors import LorafitError
from lorafit.io import atomic_write_bytes, atomic_write_json, read_json
from lorafit.lora.config import LoRAConfig
from lorafit.lora.inject import head_module_names, inject_lora, lora_config_of, lora_layers, unload_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "lorafit_adapter.json"
PREFIX = "base_model.model."

# PEFT features lorafit does not implement; an adapter using them is refused, not half-loaded.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA factors and head weights under PEFT's key names."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        for param in layer.adapter_params():
            state[f"{PREFIX}{name}.{param}"] = layer.get_parameter(param)
    for head in head_module_names(model):
        for key, value in model.get_submodule(head).state_dict().items():
            state[f"{PREFIX}{head}.{key}"] = value
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Shape facts and a few weight values of the base model, to recognise it again."""
    config = getattr(model, "config", None)
    facts = {
        k: getattr(config, k, None)
        for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    }
    # A sample of the first adapted base weight: same shape but other pretrained weights (say a
    # cased vs an uncased checkpoint) differ here. Compared with a tolerance, so an fp16 copy of
    # the same model still matches.
    first = next(lora_layers(model), None)
    if first is not None and not first[1].base_layer.weight.is_meta:
        layer = first[1]
        weight = layer.base_layer.weight.detach().float()
        if layer.merged:
            weight = weight - layer.delta_weight()
        facts["weight_sample"] = [round(v, 6) for v in weight.flatten()[:16].tolist()]
    return facts


def save_adapter(model: nn.Module, directory: str | Path, metadata: dict[str, Any] | None = None,
                 base_model: str | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` in PEFT's format (each file atomically).

    Args:
        model: A model adapted with :func:`inject_lora`.
        directory: Where to write; created if needed.
        metadata: Extra lorafit facts (task, labels, ...) stored in ``lorafit_adapter.json``.
        base_model: The base model's name for ``base_model_name_or_path`` (default: the
            ``_name_or_path`` of the model's config). Pass a name others can load (a Hub id),
            not a folder that exists only on this machine.
    """
    cfg = lora_config_of(model)
    if cfg is None:
        raise LorafitError("this model has no LoRA adapter to save (inject_lora was not called)")
    directory = Path(directory)
    base_name = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_name,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "modules_to_save": cfg.modules_to_save,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        **_UNSUPPORTED,
    }
    atomic_write_bytes(directory / WEIGHTS_NAME, save(adapter_state_dict(model), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, peft_config)
    atomic_write_json(directory / METADATA_NAME, {"base_model": base_fingerprint(model), **(metadata or {})})
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of an adapter directory (lorafit's or PEFT's)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorafitError(f"{directory}: adapter directory not found")
    path = directory / CONFIG_NAME
    raw = read_json(path, "adapter config (expected a PEFT adapter directory)")
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise LorafitError(f"{path}: 'peft_type' must be \"LORA\", got {raw.get('peft_type') if isinstance(raw, dict) else raw!r}")
    for key, neutral in _UNSUPPORTED.items():
        if raw.get(key) not in (None, neutral):
            raise LorafitError(f"{path}: '{key}' = {raw[key]!r} is not supported by lorafit (expected {neutral!r})")
    if raw.get("bias", "none") != "none":
        raise LorafitError(f"{path}: 'bias' = {raw['bias']!r} is not supported by lorafit (expected \"none\")")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise LorafitError(f"{path}: missing field '{key}'")
    targets = raw["target_modules"]
    try:
        return LoRAConfig(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=sorted(targets) if isinstance(targets, list) else targets,
            modules_to_save=raw.get("modules_to_save"),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except LorafitError as e:
        raise LorafitError(f"{path}: {e}") from None


def read_adapter_metadata(directory: str | Path) -> dict[str, Any]:
    """lorafit's metadata of an adapter directory; empty for an adapter PEFT wrote."""
    path = Path(directory) / METADATA_NAME
    return read_json(path) if path.exists() else {}


def _check_base(model: nn.Module, directory: Path, metadata: dict[str, Any]) -> None:
    saved = metadata.get("base_model")
    if not saved:
        return
    here = base_fingerprint(model)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if saved.get(key) is not None and saved.get(key) != here.get(key):
            raise LorafitError(
                f"{directory}: adapter was trained on a different base model "
                f"({key}={saved.get(key)!r}, this model has {here.get(key)!r})"
            )
    a, b = saved.get("weight_sample"), here.get("weight_sample")
    if a and b and not torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-2, atol=1e-3):
        raise LorafitError(
            f"{directory}: adapter was trained on a different base model "
            "(same shapes, but the pretrained weights differ)"
        )


def load_lora_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Copy the LoRA factors (not the head) of an adapter into an adapted model.

    This is how the paper starts MRPC, RTE and STS-B from the MNLI adapter: the low-rank updates
    carry over, while the head, whose label set differs, starts fresh. Every LoRA layer of the
    model must be in the file with the same shape.
    """
    directory = Path(directory)
    state = read_adapter_weights(directory)
    expected = {k: v for k, v in adapter_state_dict(model).items() if ".lora_A." in k or ".lora_B." in k}
    # The head of another task is in the file too: only missing LoRA keys are an error here.
    _check_fits(expected, state, directory / WEIGHTS_NAME, extra_allowed=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in expected:
            params[key[len(PREFIX):]].copy_(state[key])
    return model


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory under their saved (PEFT) key names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorafitError(f"{directory}: adapter directory not found")
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        legacy = directory / "adapter_model.bin"
        hint = " (a legacy adapter_model.bin is there: re-save it with PEFT as safetensors)" if legacy.exists() else ""
        raise LorafitError(f"{weights}: adapter weights not found{hint}")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise LorafitError(f"{weights}: not a readable safetensors file ({e})") from None


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject LoRA into ``model`` as the adapter in ``directory`` describes, and load its weights.

    Keys are checked strictly: a missing or unexpected key, a shape mismatch or a different base
    model is an error; nothing is loaded in that case, and the LoRA layers are taken out again.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    metadata = read_adapter_metadata(directory)
    weights = directory / WEIGHTS_NAME
    state = read_adapter_weights(directory)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    inject_lora(model, cfg)
    try:
        _check_state(model, directory, metadata, state, weights)
    except LorafitError:
        _remove_lora(model, requires_grad)  # a refused adapter leaves the model as it was
        raise
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            name = key[len(PREFIX):]
            target = params[name] if name in params else buffers[name]
            target.copy_(value.to(target.dtype))
    return model


def _remove_lora(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo :func:`inject_lora`: put the base linears back and restore the trainable flags."""
    unload_lora(model, merge=False)
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad[name])


def _check_state(
    model: nn.Module, directory: Path, metadata: dict[str, Any], state: dict[str, torch.Tensor], weights: Path
) -> None:
    """Refuse ``state`` unless it was saved from this base model and fits the adapted model exactly."""
    _check_base(model, directory, metadata)
    _check_fits(adapter_state_dict(model), state, weights)


def _check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], weights: Path,
                extra_allowed: bool = False) -> None:
    """Refuse ``state`` unless it has every key of ``expected`` (and no other, unless
    ``extra_allowed``), each with the expected shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = [] if extra_allowed else sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)} in all)"
            )
        hint = "; was it trained with other target modules?" if missing else ""
        raise LorafitError(f"{weights}: does not fit this model: {'; '.join(parts)}{hint}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            hint = " (use the adapter's rank)" if ".lora_" in key else ""
            raise LorafitError(
                f"{weights}: '{key}' has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}{hint}"
            )
