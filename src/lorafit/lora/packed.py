"""Unmerged inference with the adapted projections of one input packed into one product.

At batch 1, unmerged LoRA is bound by operator calls, not by arithmetic: each adapted projection
adds three operators to its frozen product (``A``'s product, ``B``'s product and the add), and on
a CPU each costs about as much as the frozen product itself (docs/performance/journal.md,
"Unmerged bf16 inference on AMX"). The projections of an attention block read the same input,
so their work can be laid out as three operators for the whole group:

* one product of the input with the frozen weights and the ``A`` factors stacked row-wise
  (``[W_q; W_v; A_q; A_v]``, bias ``[b_q; b_v; 0]``);
* one product of the ``A`` outputs with the ``B`` factors placed block-diagonally;
* one add of that, scaled, into the frozen outputs.

Every output element is the same dot product, over the same inputs, as in the layer's own
products (the block-diagonal zeros add exact zeros). Whether a kernel sums it in the same order
depends on the kernel the shape gets, so a group compares its output with its layers' own path,
bit for bit, the first time it meets a shape (rows and threads), and computes packed only
for shapes that agreed: the packed path gives :class:`~lorafit.lora.layer.LoRALinear`'s bits,
which are PEFT's, or is not taken. On a CPU it is taken for calls of up to ``MAX_ROWS`` tokens,
where operator calls dominate.

Like :meth:`~lorafit.lora.layer.LoRALinear.merge`, packing is explicit (:func:`pack_lora`) and
works from copies (the frozen weights' included: one more copy of each adapted projection's
weight). A group packs again when a tensor it was made from is replaced or changed in place by an
operation autograd counts; a write through ``.data`` is invisible to that (PyTorch keeps no
version for it), so after one, call :func:`pack_lora` again. The first layer of a group called
with an input computes the group's outputs for it; the others take theirs if they are called
with that same tensor, and compute their own otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from lorafit.lora.config import SHARED_INPUT_MODULES
from lorafit.lora.layer import LoRALinear

# Rows (tokens in a call) up to which a group computes packed on a CPU. Per-operator costs
# dominate small calls; at larger ones a wide product can take a slower kernel than two narrow
# ones. Measured on the AMX machine (query and value of the embedded model, bf16, 2 threads):
# packed took 0.56-0.75x the layers' time from 1 to 512 rows, 1.08x at 640 and 1.48x at 800, where
# oneDNN runs the 784-wide product on one thread (journal: "Packed unmerged inference"). Not
# applied on a GPU, where each operator saved is a kernel launch and no such kernel was measured.
MAX_ROWS = 512

# Precisions packed: fp32 products on a CPU (MKL) sum a wider product in another order (measured,
# journal: "Unmerged inference on the AMD EPYC"), so each new shape would cost a check that fails.
_PACKED_DTYPES = (torch.bfloat16, torch.float16)


class PackedGroup:
    """The adapted projections of one input, computed as one group (see the module docstring)."""

    def __init__(self, layers: list[LoRALinear]) -> None:
        self.layers = layers
        self._stash: tuple[torch.Tensor, dict[LoRALinear, torch.Tensor]] | None = None
        self._pack()

    def _pack(self) -> None:
        with torch.no_grad():
            weights = [layer.base_layer.weight for layer in self.layers]
            factors = [layer.lora_A.weight for layer in self.layers]
            self._outputs = sum(w.shape[0] for w in weights)  # the frozen outputs' columns
            self._weight = torch.cat([*weights, *factors])
            biases = [layer.base_layer.bias if layer.base_layer.bias is not None else w.new_zeros(w.shape[0])
                      for layer, w in zip(self.layers, weights)]
            self._bias = torch.cat([*biases, factors[0].new_zeros(sum(a.shape[0] for a in factors))])
            self._b = torch.block_diag(*(layer.lora_B.weight for layer in self.layers))
        self._columns = []  # each layer's columns of the frozen outputs
        start = 0
        for w in weights:
            self._columns.append((start, start + w.shape[0]))
            start += w.shape[0]
        # Checked at every packed computation, so kept to the tensors packed (5.9 us a call through
        # the modules' dicts against 1.3 here, for two layers): a parameter replaced by another
        # object goes unseen, like a write through `.data`.
        self._made_of = _tensors(self.layers)
        self._made_from = [(t.data_ptr(), t._version) for t in self._made_of]
        self._agrees: dict[tuple[int, int], bool] = {}

    def output(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output for ``x``, computed with its group, or None where the group does not
        apply (the layer then computes its own)."""
        stash = self._stash
        if stash is not None and stash[0] is x:  # a sibling computed it, from this same input
            out = stash[1].pop(layer, None)
            if out is not None:
                if not stash[1]:  # all taken: let the input go
                    self._stash = None
                return out
        self._stash = None
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS and x.is_cpu:
            return None
        if self._hooked():
            return None
        if [(t.data_ptr(), t._version) for t in self._made_of] != self._made_from:
            if not packable(self.layers):
                return None
            self._pack()
        shared = layer._shared_input(x)
        if shared.dtype != self._weight.dtype:
            return None
        # (No device in the key: the pack has one, and packs again when the layers move.)
        key = (rows, torch.get_num_threads())
        agrees = self._agrees.get(key)
        if agrees is False:
            return None
        outputs = self._compute(shared)
        if agrees is None:
            agrees = self._agrees[key] = all(torch.equal(outputs[other], other._forward_no_grad(x)) for other in self.layers)
            if not agrees:
                return None
        self._stash = (x, {other: out for other, out in outputs.items() if other is not layer})
        return outputs[layer]

    def _hooked(self) -> bool:
        """Whether a frozen layer has forward hooks or a replaced ``forward`` (Accelerate's device
        hooks), which its own path runs by calling it as a module, and a packed product would not."""
        return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
            base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__
            for base in (layer.base_layer for layer in self.layers))

    def _compute(self, x: torch.Tensor) -> dict[LoRALinear, torch.Tensor]:
        out = F.linear(x, self._weight, self._bias)
        frozen = out[..., : self._outputs]
        lora = F.linear(out[..., self._outputs:], self._b)
        first = self.layers[0]
        if first._scaling_is_exact:  # as LoRALinear._forward_no_grad adds it (the same bits)
            frozen.add_(lora, alpha=first.scaling)
        else:
            frozen.add_(lora.mul_(first.scaling))
        return {layer: frozen[..., start:end] for layer, (start, end) in zip(self.layers, self._columns)}

    def dissolve(self) -> None:
        """Leave the layers to compute on their own again."""
        for layer in self.layers:
            layer._packed = None
        self.layers = []
        self._stash = None


def _tensors(layers: list[LoRALinear]) -> list[torch.Tensor]:
    """The tensors a group of ``layers`` is made from, as the layers hold them now."""
    return [t for layer in layers for t in (layer.base_layer.weight, layer.base_layer.bias,
                                            layer.lora_A.weight, layer.lora_B.weight) if t is not None]


def packable(layers: list[LoRALinear]) -> bool:
    """Whether ``layers``, as they are now, can be computed as one group: unmerged, without DoRA,
    of one scale, and every tensor in bf16 or fp16 on one device (not ``meta``)."""
    first, tensors = layers[0], _tensors(layers)
    return (tensors[0].dtype in _PACKED_DTYPES and not tensors[0].is_meta
            and all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors)
            and all(not layer.merged and layer.lora_magnitude_vector is None and layer.scaling == first.scaling
                    and layer.in_features == first.in_features for layer in layers))


def _groups(model: nn.Module) -> Iterator[list[LoRALinear]]:
    """Per module, its LoRA children that read the same input (``SHARED_INPUT_MODULES``)."""
    names = SHARED_INPUT_MODULES.get(getattr(getattr(model, "config", None), "model_type", ""), ())
    for module in model.modules():
        group = [child for name, child in module.named_children() if name in names and isinstance(child, LoRALinear)]
        if len(group) > 1:
            yield group


def pack_lora(model: nn.Module) -> int:
    """Pack the adapted projections of each shared input for unmerged inference (see the module
    docstring). Packs again what is packed already; leaves layers that cannot be grouped (merged,
    DoRA, other scales, dtypes other than bf16 and fp16) on their own. Returns the number of groups."""
    unpack_lora(model)
    count = 0
    for layers in _groups(model):
        if packable(layers):
            group = PackedGroup(layers)
            for layer in layers:
                layer._packed = group
            count += 1
    return count


def unpack_lora(model: nn.Module) -> None:
    """Undo :func:`pack_lora`: each layer computes on its own again."""
    for module in model.modules():
        if isinstance(module, LoRALinear) and module._packed is not None:
            module._packed.dissolve()
