"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update.

Hu et al. (ICLR 2022), section 4.1: for a frozen weight W0 (out x in) the layer computes

    h = W0 x + b + (alpha / r) * B A x,   A: r x in (random),  B: out x r (zeros)

so that the update B A is zero at initialisation and training starts exactly at the pretrained
model. With rsLoRA (Kalajdzievski, 2023) the scale is alpha / sqrt(r) instead. Two variants are
options of the same layer, computed as PEFT computes them:

* DoRA (Liu et al., ICML 2024): W' = m * (W0 + s B A) / ||W0 + s B A||, the norm taken per output
  row and detached from the gradient (the paper's section 4.3); m starts as ||W0||.
* PiSSA (Meng et al., NeurIPS 2024): A and B start from the top-r singular triplets of W0, which
  are subtracted from the frozen weight, so the layer still starts at the pretrained function.

The attribute names (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``) follow PEFT's, so the
state-dict keys map one to one onto PEFT's adapter files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _exact_multiplier(scale: float) -> bool:
    """Whether multiplying by ``scale`` is exact in every floating dtype (a power of two, 1 or more;
    a smaller one would lose the low bits of a subnormal)."""
    return math.frexp(scale)[0] == 0.5 and scale >= 1


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
        use_dora: Add DoRA's trainable magnitude vector ``lora_magnitude_vector`` (one per output).
        init_lora_weights: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r),
            B zero) or ``"pissa"`` (A, B from the SVD of the base weight, which keeps the residual).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: str = "default",
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
        self.init_lora_weights = init_lora_weights
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(base_layer.out_features, **factory))
        self._dora_norm: torch.Tensor | None = None  # the norm merge() used, which unmerge() needs
        self.merged = False
        self._packed = None  # the group it computes with in unmerged inference (lorafit.lora.packed)
        if init_lora_weights == "pissa":
            self._pissa_init()  # once: it changes the base weight
        else:
            self.reset_lora_parameters()
        self._init_magnitude()

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
        """B = 0 and A ~ Kaiming-uniform(a=sqrt(5)) as in loralib and PEFT, or with ``"gaussian"``
        A ~ N(0, 1/r) as PEFT's option of that name (either way delta W = 0)."""
        if self.lora_A.weight.is_meta:
            return
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def _pissa_init(self) -> None:
        """W0 = U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, base weight W0 - s B A
        (PEFT's ``pissa_init``; dividing by the scale s makes s B A the top-r part of W0 exactly)."""
        weight = self.base_layer.weight
        if weight.is_meta:
            return
        u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(sigma[: self.r] / self.scaling)
        self.lora_A.weight.copy_(root[:, None] * vh[: self.r])
        self.lora_B.weight.copy_(u[:, : self.r] * root[None, :])
        weight.copy_((weight.float() - self.scaling * self.lora_B.weight.float() @ self.lora_A.weight.float()).to(weight.dtype))

    @torch.no_grad()
    def _init_magnitude(self) -> None:
        """DoRA's m = ||W0 + s B A|| per output row: the layer starts at the pretrained function."""
        if self.lora_magnitude_vector is not None and not self.lora_A.weight.is_meta:
            self.lora_magnitude_vector.copy_(self._weight_norm(self.base_layer.weight.float(), self.delta_weight()))

    @staticmethod
    def _weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + delta, dim=1)

    @property
    def scaling(self) -> float:
        return self._scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        self._scaling = value
        # Read by every evaluation call, so worked out here, once per scale.
        self._scaling_is_exact = _exact_multiplier(value)

    def adapter_params(self) -> list[str]:
        """Names (relative to this module) of the parameters that make up the adapter."""
        dora = ["lora_magnitude_vector"] if self.lora_magnitude_vector is not None else []
        return ["lora_A.weight", "lora_B.weight", *dora]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (A packed layer is neither merged nor DoRA's: merge() unpacks, DoRA never packs.)
        if self._packed is not None and not self.training and not torch.is_grad_enabled():
            out = self._packed.output(self, x)
            if out is not None:
                return out
        if not self.merged and not self.training and self.lora_magnitude_vector is None and not torch.is_grad_enabled():
            return self._forward_no_grad(x)
        result = self.base_layer(x)
        if self.merged:
            return result
        # Dropout is the identity in eval mode, and lora_A / lora_B are plain linear maps: calling
        # F.linear on their weights does the same arithmetic without three module calls, which at
        # batch 1 (and in any host-bound GPU step) cost more than the small matmuls themselves.
        lora_in = (self.lora_dropout(x) if self.training else x).to(self.lora_A.weight.dtype)
        lora_out = F.linear(F.linear(lora_in, self.lora_A.weight), self.lora_B.weight) * self.scaling
        if self.lora_magnitude_vector is None:
            return result + lora_out.to(result.dtype)
        return result + self._dora_extra(lora_in, result, lora_out).to(result.dtype)

    def _forward_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` in evaluation without autograd: the same bits in fewer operator calls.

        Unmerged inference at batch 1 is bound by the cost of each call, Python's included, not
        by arithmetic (docs/performance/journal.md, "Inference in bf16", "Unmerged bf16 inference
        on AMX"), so calls of the general path go, and no state is kept that would need checking:
        * where autocast would cast the input of the frozen product to the dtype the layer and
          the factors are held in (``lorafit eval`` of a bf16 run), it is cast once here and
          shared with the branch: the same rounding;
        * the branch is added into the frozen product's output in place, and a scale that is a
          power of two, 1 or more, goes in as the add's ``alpha``: the kernel computes
          ``result + s * branch`` in fp32 or wider and rounds once, and ``s * branch`` is exact
          in every dtype, so that is the general path's ``result + round(s * branch)`` (up to an
          overflow of ``s * branch`` itself, which is inf there).
        (A layer packed with its siblings by :func:`lorafit.lora.packed.pack_lora` computes with
        them first, where their group applies.) Training takes none of this: the gradients of a
        shared cast would be summed in the low precision.
        """
        # Straight from the dicts: `self.lora_A.weight` goes through nn.Module.__getattr__ twice,
        # a visible share of the branch at batch 1.
        modules = self._modules
        weight_a = modules["lora_A"]._parameters["weight"]
        dtype = weight_a.dtype
        x = self._shared_input(x)
        result = modules["base_layer"](x)
        hidden = F.linear(x if x.dtype == dtype else x.to(dtype), weight_a)
        lora_out = F.linear(hidden, modules["lora_B"]._parameters["weight"])
        if self._scaling_is_exact and lora_out.dtype == result.dtype:
            return result.add_(lora_out, alpha=self._scaling)
        return result.add_(lora_out.mul_(self._scaling).to(result.dtype))

    def _shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` cast once to the layer's dtype where autocast would cast it for the frozen product."""
        # (The device type from flags: `x.device.type` builds a device object, about a point of the
        # model's time at batch 1 on a CPU.)
        device_type = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
        dtype = self._modules["lora_A"]._parameters["weight"].dtype
        if x.dtype != dtype and self._modules["base_layer"]._parameters["weight"].dtype == dtype \
                and torch.get_autocast_dtype(device_type) == dtype:
            return x.to(dtype)  # (without autocast the frozen product would refuse x's dtype)
        return x

    def _dora_extra(self, lora_in: torch.Tensor, result: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: (m / ||W + s B A|| - 1) W x + m / ||W + s B A|| s B A x."""
        weight = self.base_layer.weight.to(lora_in.dtype)
        with torch.no_grad():  # the norm follows the update but gets no gradient (DoRA section 4.3, as PEFT)
            norm = self._weight_norm(weight, self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        scale = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result - self.base_layer.bias if self.base_layer.bias is not None else result
        else:  # as PEFT: with dropout active, the rescaled base term sees the dropped input too
            base_out = F.linear(lora_in, weight)
        return (scale - 1) * base_out + scale * lora_out

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
        if self._packed is not None:  # the group computes unmerged layers only
            self._packed.dissolve()
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight()
        if self.lora_magnitude_vector is not None:  # DoRA: rescale each row to its magnitude
            self._dora_norm = self._weight_norm(weight.float(), self.delta_weight())
            merged = merged * (self.lora_magnitude_vector.float() / self._dora_norm)[:, None]
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again (the inverse of :meth:`merge`).

        Exact up to one rounding of the base dtype (about 1e-7 relative in fp32).
        """
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(self.unmerged_weight().to(weight.dtype))
        self._dora_norm = None
        self.merged = False

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without the update (fp32), whether merged or not."""
        weight = self.base_layer.weight.float()
        if not self.merged:
            return weight
        if self._dora_norm is not None:
            weight = weight / (self.lora_magnitude_vector.float() / self._dora_norm)[:, None]
        return weight - self.delta_weight()

    def extra_repr(self) -> str:
        dora = ", dora=True" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}, merged={self.merged}"
