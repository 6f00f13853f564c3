"""Putting LoRA into a model, finding it again, merging it and taking it out.

The model is changed in place and stays a plain Transformers model: every targeted ``nn.Linear``
becomes a :class:`LoRALinear` wrapping it, the rest of the model is frozen, and the task head
(``modules_to_save``) stays trainable.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.config import LoRAConfig, default_heads
from lorafit.lora.layer import LoRALinear

STATE_NAME = "lora_state"


class LoRAState(nn.Module):
    """The resolved :class:`LoRAConfig` of an adapted model, attached as its submodule ``lora_state``.

    A module rather than a loose attribute, so that it shows in ``print(model)``; it has no
    parameters or buffers, so the model's state dict is unchanged. :func:`merge_and_unload`
    and a refused :func:`~lorafit.lora.load_adapter` take it out again.
    """

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__()
        self.config = config

    def extra_repr(self) -> str:
        return repr(self.config)


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The resolved LoRA config of a model adapted by :func:`inject_lora`, or None."""
    state = getattr(model, STATE_NAME, None)
    return state.config if isinstance(state, LoRAState) else None


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def _name_matches(name: str, targets: list[str] | str) -> bool:
    # PEFT's rule: a list entry matches the full name or a dotted suffix of it; a string is a
    # regex that must match the whole name.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve_heads(model: nn.Module, heads: list[str]) -> list[str]:
    """Full module names of the head modules (entries may be suffixes, as for targets)."""
    names = [n for n, _ in model.named_modules() if n]
    found = [n for n in names if _name_matches(n, heads)]
    # Keep only outermost matches: "classifier" must not also pick "classifier.dense" twice.
    return [n for n in found if not any(n != o and n.startswith(o + ".") for o in found)]


def find_target_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules ``config`` adapts, outside the head.

    Raises:
        LorafitError: if nothing matches, listing what was tried and some names the model has.
    """
    return _find_targets(model, config.resolved(model_type_of(model)))


def _find_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    heads = _resolve_heads(model, cfg.modules_to_save or [])
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _under(n, heads)]
    matched = [n for n in linear if _name_matches(n, cfg.target_modules)]
    if not matched:
        tried = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules)
        leaves = sorted({n.split(".")[-1] for n in linear})
        raise LorafitError(
            f"LoRA target_modules ({tried}) match no linear layer of this "
            f"{type(model).__name__}; its linear layers are named: {', '.join(leaves[:12])}"
        )
    return matched


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Adapt ``model`` in place: wrap target linears in :class:`LoRALinear`, freeze the rest,
    keep the head trainable.

    Returns:
        The same model object.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LorafitError("this model already has LoRA layers; inject LoRA once")
    cfg = config.resolved(model_type_of(model))
    targets = _find_targets(model, cfg)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(getattr(parent, child), cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora,
                           use_dora=cfg.use_dora, init_lora_weights=cfg.init_lora_weights)
        setattr(parent, child, layer)
    for head in _resolve_heads(model, cfg.modules_to_save or []):
        model.get_submodule(head).requires_grad_(True)
    model.add_module(STATE_NAME, LoRAState(cfg))
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def head_module_names(model: nn.Module) -> list[str]:
    """Full names of the trained-and-saved head modules of an adapted model."""
    cfg = lora_config_of(model)
    # Not adapted (full fine-tuning): the architecture's default head.
    heads = cfg.modules_to_save if cfg is not None else default_heads(model_type_of(model))
    return _resolve_heads(model, heads or [])


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight (idempotent)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put each base ``nn.Linear`` back in place of its wrapper.

    The result is a plain Transformers model whose ``save_pretrained`` output loads with vanilla
    ``from_pretrained``, with no lorafit installed.
    """
    return unload_lora(model, merge=True)


def unload_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Put each base ``nn.Linear`` back in place of its LoRA wrapper, with the update merged into
    it (``merge``) or taken out of it (the model as it was before :func:`inject_lora`)."""
    for name, layer in list(lora_layers(model)):
        if layer._packed is not None:
            layer._packed.dissolve()
        layer.merge() if merge else layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if lora_config_of(model) is not None:
        delattr(model, STATE_NAME)
    return model


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model; ``trainable = adapter + head (+ other)``."""

    adapter: int
    head: int
    trainable: int
    total: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable parameters split into LoRA adapter and task head.

    The paper's "# trainable" counts adapters only (Table 2); the head is trained too, and is
    reported separately.
    """
    adapter_ids = {id(layer.get_parameter(p)) for _, layer in lora_layers(model) for p in layer.adapter_params()}
    head_ids = {id(p) for h in head_module_names(model) for p in model.get_submodule(h).parameters()}
    params = {id(p): p for p in model.parameters()}
    adapter = sum(p.numel() for i, p in params.items() if i in adapter_ids)
    head = sum(p.numel() for i, p in params.items() if i in head_ids and p.requires_grad)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    return ParameterCount(adapter=adapter, head=head, trainable=trainable, total=total)
