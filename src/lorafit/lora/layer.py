"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update.

Hu et al. (ICLR 2022), section 4.1: for a frozen weight W0 (out x in) the layer computes

    h = W0 x + b + (alpha / r) * B A x,   A: r x in (random),  B: out x r (zeros)

so that the update B A is zero at initialisation and training starts exactly at the pretrained
model. With rsLoRA (Kalajdzievski, 2023) the scale is alpha / sqrt(r) instead.

The attribute names (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``) follow PEFT's, so the
state-dict keys map one to one onto PEFT's adapter files.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with a low-rank update ``(alpha / r) * B @ A``.

    ``merge()`` folds the update into the base weight for zero-overhead inference and
    ``unmerge()`` takes it out again. Neither ``train()`` nor ``eval()`` merges: merging is
    always explicit.

    Args:
        base_layer: The linear layer to adapt. Its parameters are frozen.
        r: Rank of the update.
        alpha: Scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: Dropout probability on the input of the LoRA branch (``nn.Identity`` when 0).
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base_layer.weight.device}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight` of a projection directly (dtype checks, tied weights).
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) and B = 0, as in loralib and PEFT (so delta W = 0)."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_params(self) -> list[str]:
        """Names (relative to this module) of the parameters that make up the adapter."""
        return ["lora_A.weight", "lora_B.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lora_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return result + (self.lora_B(self.lora_A(lora_in)) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` (out x in), computed and returned in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight. Idempotent: merging a merged layer does nothing.

        The sum is formed in fp32 and rounded once to the base dtype, so a bf16/fp16 base does
        not accumulate the rounding error of a low-precision add.
        """
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (the inverse of :meth:`merge`).

        Exact up to one rounding of the base dtype (about 1e-7 relative in fp32).
        """
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
