"""LoRA configuration and the per-architecture defaults, kept as data."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from lorafit.errors import LorafitError

# Which projections get LoRA by default (paper section 4.2 and Table 5: W_q and W_v). These are
# the same modules PEFT picks for these model types.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"),
}

# The projections that read the same input (an attention block's query, key and value): where
# several are adapted, `pack_lora` computes their LoRA work as one group for unmerged inference.
SHARED_INPUT_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
    "xlm-roberta": ("query", "key", "value"),
    "electra": ("query", "key", "value"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj"),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
}

# Modules that are trained in full and saved with the adapter: the task head, which is freshly
# initialised and must learn. DeBERTa's pooler is new too (it is not in the pretrained
# checkpoints), unlike BERT's, which is pretrained. Freezing these was the seed project's main bug.
DEFAULT_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("classifier",),
    "roberta": ("classifier",),
    "xlm-roberta": ("classifier",),
    "electra": ("classifier",),
    "deberta-v2": ("classifier", "pooler"),
    "distilbert": ("pre_classifier", "classifier"),
}

# How LoRA factors may start (PEFT's names; "default" is PEFT's True).
INIT_LORA_WEIGHTS = ("default", "gaussian", "pissa")


class LoRAConfigError(LorafitError):
    """A LoRA setting out of its range. Carries the field and the rule, so that
    :class:`~lorafit.config.TrainConfig` can name its own flag (``--rank``) for ``r``."""

    def __init__(self, field: str, rule: str, value: Any) -> None:
        self.field, self.rule, self.value = field, rule, value
        super().__init__(f"LoRA config field {field!r} {rule}, got {value!r}")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def default_heads(model_type: str) -> list[str]:
    """The modules trained in full with LoRA for ``model_type`` (the task head)."""
    return list(DEFAULT_HEAD_MODULES.get(model_type, ("classifier",)))


@dataclass
class LoRAConfig:
    """How to adapt a model with LoRA. Every rule on these values is checked here, once.

    Args:
        r: Rank of each update (>= 1).
        alpha: Scaling numerator (> 0); updates are scaled by ``alpha / r``.
        dropout: Dropout on the LoRA branch input, in [0, 1).
        target_modules: Module names to adapt, each matching a module's full dotted name or its
            last components (``"query"`` matches ``...attention.self.query``); or one regular
            expression that must match the full name. ``None`` uses the architecture's default.
        modules_to_save: Modules trained in full and saved with the adapter (the task head).
            ``None`` uses the architecture's default.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: Weight-decomposed LoRA (DoRA): a trained magnitude per output row.
        init_lora_weights: One of :data:`INIT_LORA_WEIGHTS`: ``"default"`` (PEFT's ``True``),
            ``"gaussian"`` or ``"pissa"`` (PEFT's names).

    Raises:
        LoRAConfigError: naming the first field out of range.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise LoRAConfigError("r", "must be an integer", self.r)
        if self.r < 1:
            raise LoRAConfigError("r", "must be > 0", self.r)
        if not _is_number(self.alpha):
            raise LoRAConfigError("alpha", "must be a number", self.alpha)
        if not self.alpha > 0:
            raise LoRAConfigError("alpha", "must be > 0", self.alpha)
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise LoRAConfigError("dropout", "must be in [0, 1)", self.dropout)
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise LoRAConfigError("target_modules", "must be a regex or a list of names, not an empty string",
                                      self.target_modules)
        elif self.target_modules is not None:
            self.target_modules = self._names("target_modules", self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = self._names("modules_to_save", self.modules_to_save)
        if self.init_lora_weights not in INIT_LORA_WEIGHTS:
            raise LoRAConfigError("init_lora_weights", f"must be one of {', '.join(INIT_LORA_WEIGHTS)}",
                                  self.init_lora_weights)

    @staticmethod
    def _names(field: str, value: Any) -> list[str]:
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            raise LoRAConfigError(field, "must be a non-empty list of module names", value)
        return list(value)

    def resolved(self, model_type: str) -> LoRAConfig:
        """A copy with the architecture's defaults in place of ``None`` targets and heads."""
        targets = self.target_modules
        if targets is None:
            if model_type not in DEFAULT_TARGET_MODULES:
                raise LorafitError(
                    f"no default LoRA target modules for model type {model_type!r}; "
                    f"set 'target_modules' (known defaults: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
                )
            targets = list(DEFAULT_TARGET_MODULES[model_type])
        heads = default_heads(model_type) if self.modules_to_save is None else self.modules_to_save
        return dataclasses.replace(self, target_modules=targets, modules_to_save=heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
