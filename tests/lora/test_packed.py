"""Packed unmerged inference (lorafit.lora.packed): each layer's own bits, in fewer operators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafit.inference import cast_linears_bf16
from lorafit.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_layers,
    merge_lora,
    pack_lora,
    packed,
    unpack_lora,
)
from lorafit.lora.packed import PackedGroup


def _integer_layers(outs=(24, 24, 16), ranks=(4, 2, 4), seed=0) -> list[LoRALinear]:
    """bf16 layers of one input whose weights are small integers: with an integer input every
    product and sum is exact, so any kernel, summing in any order, gives the same bits."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for out, r in zip(outs, ranks):
        layer = LoRALinear(nn.Linear(32, out), r=r, alpha=2.0 * r)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, generator=g))
        layers.append(layer.to(torch.bfloat16).eval())
    return layers


def _packed_model(tiny_model, randomize, arch: str, **lora) -> nn.Module:
    model = inject_lora(tiny_model(arch), LoRAConfig(r=4, alpha=8, **lora).resolved(arch))
    randomize(model)
    cast_linears_bf16(model)
    return model.eval()


def _packed_and_twin(tiny_model, randomize, arch: str = "bert") -> tuple[nn.Module, nn.Module, int]:
    """A packed model, its unpacked twin (the same weights), and how many groups it has."""
    model, twin = _packed_model(tiny_model, randomize, arch), _packed_model(tiny_model, randomize, arch)
    return model, twin, pack_lora(model)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**inputs).logits


def test_a_group_computes_once_and_gives_each_layer_its_own_bits():
    layers = _integer_layers()
    x = torch.randint(-2, 3, (2, 5, 32)).to(torch.bfloat16)
    with torch.inference_mode():
        own = [layer._forward_no_grad(x) for layer in layers]
        group = PackedGroup(layers)
        first = group.output(layers[0], x)
        assert group._agrees == {(10, torch.get_num_threads()): True}
        rest = [group.output(layer, x) for layer in layers[1:]]
    for out, expected in zip([first, *rest], own):
        assert out.shape == expected.shape and torch.equal(out, expected)
    # One product gave them all: the others' outputs are views of the first one's storage.
    assert {out.untyped_storage().data_ptr() for out in rest} == {first.untyped_storage().data_ptr()}
    assert group._stash is None  # all taken: the input is not kept


def test_a_shape_whose_bits_differ_is_left_to_the_layers(monkeypatch):
    layers = _integer_layers()
    group = PackedGroup(layers)
    computed = []

    def off_by_one(x):  # a kernel that summed in another order, as it might for some shape
        outputs = PackedGroup._compute(group, x)
        outputs[layers[1]][..., 0] += 1
        computed.append(x.shape)
        return outputs

    monkeypatch.setattr(group, "_compute", off_by_one)
    x = torch.randint(-2, 3, (3, 32)).to(torch.bfloat16)
    with torch.inference_mode():
        assert group.output(layers[0], x) is None and group._agrees == {(3, torch.get_num_threads()): False}
        assert group.output(layers[1], x) is None
        assert len(computed) == 1  # checked once; the shape is not tried again
        for layer in layers:  # through the layer: its own path, with its own bits
            layer._packed = group
            assert torch.equal(layer(x), layer._forward_no_grad(x))


def test_on_a_cpu_a_call_of_many_rows_is_left_to_the_layers(monkeypatch):
    # Above MAX_ROWS a wide product can take a slower kernel than the layers' own (on AMX from
    # about 640 rows): not checked, not computed.
    monkeypatch.setattr(packed, "MAX_ROWS", 4)
    layers = _integer_layers()
    group = PackedGroup(layers)
    with torch.inference_mode():
        assert group.output(layers[0], torch.ones(5, 32, dtype=torch.bfloat16)) is None
        assert group._agrees == {} and group._stash is None
        assert group.output(layers[0], torch.ones(1, 4, 32, dtype=torch.bfloat16)) is not None


def test_a_packed_model_gives_the_unpacked_logits(tiny_model, randomize, batch, arch):
    model, twin, groups = _packed_and_twin(tiny_model, randomize, arch)
    assert groups == 2  # one group (query and value) per attention block, 2 layers
    groups = {id(layer._packed) for _, layer in lora_layers(model)}
    assert len(groups) == 2 and None not in groups
    assert torch.equal(_logits(model, batch), _logits(twin, batch))
    # The groups checked this shape; where its bits agreed they computed it, else the layers did.
    assert all(layer._packed._agrees for _, layer in lora_layers(model))
    unpack_lora(model)
    assert all(layer._packed is None for _, layer in lora_layers(model))


def test_the_group_follows_the_weights(tiny_model, randomize, batch):
    model, twin, _ = _packed_and_twin(tiny_model, randomize)
    for m in (model, twin):  # in place, as an optimizer step or load_state_dict would
        with torch.no_grad():
            m.bert.encoder.layer[0].attention.self.value.lora_B.weight.mul_(-3)
            m.bert.encoder.layer[1].attention.self.query.base_layer.bias.add_(1)
    assert torch.equal(_logits(model, batch), _logits(twin, batch))
    for m in (model, twin):  # .to() puts new storage under the same parameters
        m.bert.encoder.layer[1].attention.self.value.lora_A.to(torch.float32).to(torch.bfloat16)
    assert torch.equal(_logits(model, batch), _logits(twin, batch))
    for m in (model, twin):  # a write through .data counts no version: pack again after one
        m.bert.encoder.layer[0].attention.self.query.lora_B.weight.data.mul_(2)
    pack_lora(model)
    assert torch.equal(_logits(model, batch), _logits(twin, batch))


def test_pack_lora_leaves_alone_what_it_cannot_group(tiny_model, randomize):
    fp32 = inject_lora(tiny_model("bert"), LoRAConfig(r=4, alpha=8).resolved("bert")).eval()
    assert pack_lora(fp32) == 0  # fp32 products (MKL's on a CPU) sum a wider product in another order
    assert pack_lora(_packed_model(tiny_model, randomize, "bert", use_dora=True)) == 0
    model = _packed_model(tiny_model, randomize, "bert", target_modules=["query", "key", "value", "dense"])
    assert pack_lora(model) == 2  # query, key and value per block; the dense layers read other inputs
    assert {len(layer._packed.layers) for _, layer in lora_layers(model) if layer._packed is not None} == {3}
    model.bert.encoder.layer[0].attention.self.key.merge()  # a merged layer leaves its group
    block = model.bert.encoder.layer[0].attention.self
    assert all(getattr(block, name)._packed is None for name in ("query", "key", "value"))
    assert model.bert.encoder.layer[1].attention.self.key._packed is not None
    merge_lora(model)
    assert all(layer._packed is None for _, layer in lora_layers(model))


def test_a_frozen_layer_with_hooks_runs_them(tiny_model, randomize, batch):
    # A hook on a frozen layer (or Accelerate's replaced forward) runs only if the layer is called.
    model, twin, _ = _packed_and_twin(tiny_model, randomize)
    calls = []
    for m in (model, twin):
        m.bert.encoder.layer[0].attention.self.value.base_layer.register_forward_hook(
            lambda module, args, out: calls.append(1) or out * 2)
    assert torch.equal(_logits(model, batch), _logits(twin, batch)) and len(calls) == 2
    for m in (model, twin):  # as Accelerate's device hooks replace it
        base = m.bert.encoder.layer[1].attention.self.query.base_layer
        base.forward = lambda x, forward=base.forward: forward(x) - 1
    assert torch.equal(_logits(model, batch), _logits(twin, batch))
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        assert torch.equal(_logits(model, batch), _logits(twin, batch))
    finally:
        handle.remove()


def test_training_and_autograd_leave_the_group_aside(tiny_model, randomize, batch):
    model = _packed_model(tiny_model, randomize, "bert")
    pack_lora(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert all(layer.lora_B.weight.grad is not None for _, layer in lora_layers(model))
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = model(**inputs).logits  # autograd on: the general path
    assert with_grad.requires_grad
    assert torch.equal(with_grad.detach(), _logits(model, batch))


@pytest.mark.gpu
def test_a_packed_model_gives_the_unpacked_logits_on_a_gpu(tiny_model, randomize, batch):
    model, twin = (m.cuda() for m in _packed_and_twin(tiny_model, randomize)[:2])
    assert pack_lora(model) == 2  # again, on the GPU
    on_gpu = {k: v.cuda() for k, v in batch.items() if k != "labels"}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(**on_gpu).logits, twin(**on_gpu).logits)
    assert all(layer._packed._agrees for _, layer in lora_layers(model))
