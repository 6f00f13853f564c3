"""LoRA configuration and the per-architecture defaults, kept as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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


@dataclass
class LoRAConfig:
    """How to adapt a model with LoRA.

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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LorafitError(f"LoRA config field 'r' must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LorafitError(f"LoRA config field 'alpha' must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LorafitError(f"LoRA config field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise LorafitError(
                    f"LoRA config field 'target_modules' must be a non-empty list of module names, "
                    f"got {self.target_modules!r}"
                )
        elif isinstance(self.target_modules, str) and not self.target_modules:
            raise LorafitError("LoRA config field 'target_modules' must not be an empty string")
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise LorafitError(
                f"LoRA config field 'target_modules' must be a list of names or a regex, "
                f"got {self.target_modules!r}"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.init_lora_weights not in INIT_LORA_WEIGHTS:
            raise LorafitError(
                f"LoRA config field 'init_lora_weights' must be one of {', '.join(INIT_LORA_WEIGHTS)}, "
                f"got {self.init_lora_weights!r}"
            )

    def resolved(self, model_type: str) -> LoRAConfig:
        """A copy with architecture defaults filled in for ``None`` fields."""
        targets = self.target_modules
        if targets is None:
            if model_type not in DEFAULT_TARGET_MODULES:
                raise LorafitError(
                    f"no default LoRA target modules for model type {model_type!r}; "
                    f"set 'target_modules' (known defaults: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
                )
            targets = list(DEFAULT_TARGET_MODULES[model_type])
        heads = self.resolved_heads_only(model_type).modules_to_save
        return replace(self, target_modules=targets, modules_to_save=heads)

    def resolved_heads_only(self, model_type: str) -> LoRAConfig:
        heads = self.modules_to_save
        if heads is None:
            heads = list(DEFAULT_HEAD_MODULES.get(model_type, ("classifier",)))
        return replace(self, modules_to_save=heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
