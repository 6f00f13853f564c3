"""LoRALinear on its own: initialisation, scaling, dropout, and merge arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafit.lora import LoRALinear


def _layer(in_features=16, out_features=12, r=4, alpha=8.0, seed=0, **kwargs) -> LoRALinear:
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(in_features, out_features), r=r, alpha=alpha, **kwargs)


def _nonzero_b(layer: LoRALinear, seed=1) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    return layer


def test_shapes_and_frozen_base():
    layer = _layer(in_features=16, out_features=12, r=4)
    assert layer.lora_A.weight.shape == (4, 16)
    assert layer.lora_B.weight.shape == (12, 4)
    assert (layer.in_features, layer.out_features) == (16, 12)
    assert layer.weight is layer.base_layer.weight
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert layer.adapter_params() == ["lora_A.weight", "lora_B.weight"]
    assert layer(torch.randn(5, 3, 16)).shape == (5, 3, 12)


def test_wraps_only_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=2)


def test_init_a_kaiming_uniform_b_zero():
    in_features = 64
    layer = _layer(in_features=in_features, out_features=48, r=8)
    a = layer.lora_A.weight
    # kaiming_uniform_(a=sqrt(5)): bound = gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5)),
    # i.e. 1 / sqrt(fan_in).
    bound = 1 / math.sqrt(in_features)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.9 * bound  # spread over the whole range, not a tiny init
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert torch.equal(layer.lora_B.weight, torch.zeros(48, 8))
    assert torch.equal(layer.delta_weight(), torch.zeros(48, 64))


def test_zero_b_output_equals_base():
    layer = _layer()
    x = torch.randn(7, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize(
    ("r", "alpha", "use_rslora", "expected"),
    [
        (4, 8.0, False, 2.0),  # alpha / r
        (16, 8.0, False, 0.5),
        (1, 3, False, 3.0),
        (16, 8.0, True, 2.0),  # rsLoRA: alpha / sqrt(r)
        (4, 8.0, True, 4.0),
    ],
)
def test_scaling(r, alpha, use_rslora, expected):
    layer = _layer(r=r, alpha=alpha, use_rslora=use_rslora)
    assert layer.scaling == expected


def test_forward_adds_scaled_low_rank_update():
    layer = _nonzero_b(_layer(r=4, alpha=8.0))
    x = torch.randn(5, 16)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ w.T + b + 2.0 * (x @ a.T @ bb.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_dropout_module():
    assert isinstance(_layer(dropout=0.0).lora_dropout, nn.Identity)
    layer = _layer(dropout=0.25)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    assert layer.lora_dropout.p == 0.25


def test_dropout_acts_on_lora_branch_only_in_training():
    layer = _nonzero_b(_layer(dropout=0.5))
    x = torch.randn(64, 16)
    layer.eval()
    ref = layer(x)
    assert torch.equal(layer(x), ref)  # eval: deterministic
    with torch.no_grad():  # and the branch sees the whole input
        assert torch.equal(ref, layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    assert not torch.allclose(out, ref)
    # the base path never sees dropout: with B = 0 training output is the base output exactly
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    assert torch.equal(layer(x), layer.base_layer(x))


def test_train_and_eval_never_merge():
    layer = _nonzero_b(_layer())
    w0 = layer.base_layer.weight.clone()
    layer.train()
    layer.eval()
    layer.train()
    assert layer.merged is False
    assert torch.equal(layer.base_layer.weight, w0)
    layer.merge()
    merged = layer.base_layer.weight.clone()
    layer.eval()
    layer.train()
    assert layer.merged is True
    assert torch.equal(layer.base_layer.weight, merged)


def test_hand_computed_merge_is_exact():
    base = nn.Linear(2, 3, bias=False)
    layer = LoRALinear(base, r=1, alpha=2.0)  # scaling = alpha / r = 2
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        layer.lora_A.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [2.0], [-0.5]]))
    # B @ A = [[1, -1], [2, -2], [-0.5, 0.5]]; times 2 = [[2, -2], [4, -4], [-1, 1]]
    expected_delta = torch.tensor([[2.0, -2.0], [4.0, -4.0], [-1.0, 1.0]])
    expected_merged = torch.tensor([[3.0, 0.0], [7.0, 0.0], [4.0, 7.0]])
    assert torch.equal(layer.delta_weight(), expected_delta)
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged is True
    assert torch.equal(layer.base_layer.weight, expected_merged)
    assert torch.equal(layer(x), x @ expected_merged.T)
    assert torch.equal(unmerged_out, x @ expected_merged.T)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))


def test_merge_is_idempotent_and_unmerge_inverts_it():
    layer = _nonzero_b(_layer(in_features=32, out_features=24, r=4))
    w0 = layer.base_layer.weight.clone()
    x = torch.randn(6, 32)
    ref = layer(x)
    layer.merge()
    once = layer.base_layer.weight.clone()
    assert not torch.equal(once, w0)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    layer.unmerge()
    assert layer.merged is False
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    layer.unmerge()  # unmerging an unmerged layer does nothing
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)


def test_merge_into_bf16_base_is_rounded_once_from_fp32():
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(48, 8) * 0.01)  # small updates: rounding matters
    w = base.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    exact = w.float() + delta
    layer.merge()
    merged = base.weight.detach()
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, exact.to(torch.bfloat16))
    # Adding in bf16 rounds twice (delta, then the sum) and is never closer to the exact sum.
    naive = w + delta.to(torch.bfloat16)
    err_merged = (merged.float() - exact).abs()
    err_naive = (naive.float() - exact).abs()
    assert torch.all(err_merged <= err_naive)
    assert err_merged.sum() < err_naive.sum()


def test_bf16_base_forward_keeps_dtype():
    torch.manual_seed(0)
    layer = _nonzero_b(LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=2, alpha=4.0))
    out = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_extra_repr_mentions_rank_and_merge_state():
    layer = _layer(r=4, alpha=8.0)
    assert "r=4" in repr(layer) and "scaling=2" in repr(layer) and "merged=False" in repr(layer)


# Evaluation without autograd takes a shorter path (LoRALinear._forward_no_grad); it must give
# the general path's bits in every precision lorafit evaluates in.
_PRECISIONS = {
    "fp32": (None, False, False),  # (autocast dtype, frozen layer held in bf16, factors held in bf16)
    "autocast": (torch.bfloat16, False, False),
    "autocast, frozen bf16": (torch.bfloat16, True, False),
    "autocast, all held bf16": (torch.bfloat16, True, True),  # as lorafit eval holds a bf16 run
}


def _held(layer: LoRALinear, precision: str) -> LoRALinear:
    _, frozen_bf16, factors_bf16 = _PRECISIONS[precision]
    if frozen_bf16:
        layer.base_layer.to(torch.bfloat16)
    if factors_bf16:
        layer.lora_A.to(torch.bfloat16)
        layer.lora_B.to(torch.bfloat16)
    return layer.eval()


def _both_paths(layer: LoRALinear, x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _PRECISIONS[precision][0]
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        general = layer(x)  # autograd on: the path training takes
        with torch.inference_mode():
            short = layer(x)
    return general.detach(), short


@pytest.mark.parametrize("precision", list(_PRECISIONS))
@pytest.mark.parametrize(("r", "alpha", "use_rslora"), [(4, 8.0, False), (4, 4.0, False), (4, 2.0, False), (4, 6.0, False), (4, 8.0, True)])
def test_inference_path_gives_the_general_paths_bits(precision, r, alpha, use_rslora):
    # Scales 2 and 4 (rsLoRA; the in-place add's alpha), 1, and 0.5 and 1.5 (multiplied after the product).
    layer = _held(_nonzero_b(_layer(64, 48, r=r, alpha=alpha, use_rslora=use_rslora)), precision)
    x = torch.randn(3, 7, 64)
    general, short = _both_paths(layer, x, precision)
    assert short.dtype == general.dtype
    assert torch.equal(short, general)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(_PRECISIONS))
@pytest.mark.parametrize("alpha", [8.0, 6.0])
def test_inference_path_gives_the_general_paths_bits_on_a_gpu(precision, alpha):
    # On a GPU the path takes the device type from the tensor's flags and adds on cuBLAS's outputs.
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=alpha)), precision).cuda()
    general, short = _both_paths(layer, torch.randn(3, 7, 64, device="cuda"), precision)
    assert short.device.type == "cuda" and torch.equal(short, general)


@pytest.mark.parametrize("precision", ["fp32", "autocast, all held bf16"])
@pytest.mark.parametrize("name", ["base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"])
def test_inference_path_follows_changes_to_the_weights(precision, name):
    # The path reads the weights at every call: a change to one, however made, must show.
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=8.0)), precision)
    module_name, param_name = name.split(".")
    module = layer.get_submodule(module_name)
    x = torch.randn(2, 5, 64)
    first, _ = _both_paths(layer, x, precision)
    with torch.no_grad():
        getattr(module, param_name).mul_(-3)  # in place, as an optimizer step or load_state_dict
    general, short = _both_paths(layer, x, precision)
    assert not torch.equal(general, first) and torch.equal(short, general)
    setattr(module, param_name, nn.Parameter(getattr(module, param_name).detach() * 3))  # replaced outright
    general, short = _both_paths(layer, x, precision)
    assert torch.equal(short, general)
    param, dtype = getattr(module, param_name), getattr(module, param_name).dtype
    module.to(torch.float64).to(dtype)  # .to() swaps the storage under the same Parameter
    param.data = param.data * 2  # as does assigning .data
    assert getattr(module, param_name) is param
    general, short = _both_paths(layer, x, precision)
    assert torch.equal(short, general)


@pytest.mark.parametrize("precision", ["fp32", "autocast, all held bf16"])
def test_inference_path_sees_a_change_through_data(precision):
    # A change through `.data` bumps no version counter that a kept copy of B could watch (the
    # shorter path once kept a scaled B and missed it); the path reads B at every call.
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=8.0)), precision)
    x = torch.randn(2, 5, 64)
    first, _ = _both_paths(layer, x, precision)
    layer.lora_B.weight.data.mul_(-2)
    general, short = _both_paths(layer, x, precision)
    assert not torch.equal(general, first) and torch.equal(short, general)


@pytest.mark.parametrize("precision", ["fp32", "autocast, all held bf16"])
def test_inference_path_follows_a_changed_scale(precision):
    # Whether the scale goes in as the add's alpha is worked out when the scale is set: a scale
    # set after the layer was built (as PEFT's set_scale does) must be followed, either way.
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=8.0)), precision)
    x = torch.randn(2, 5, 64)
    outputs = []
    for scale in (2.0, 1.5, 4.0, 0.5):
        layer.scaling = scale
        general, short = _both_paths(layer, x, precision)
        assert torch.equal(short, general)
        outputs.append(short)
    assert not any(torch.equal(outputs[0], other) for other in outputs[1:])


def test_inference_path_runs_the_frozen_layers_hooks():
    # A hook on the frozen layer (a user's, or one that records activations) must still fire on
    # the shorter path: it calls the frozen layer, not its weights.
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=8.0)), "autocast, all held bf16")
    seen = []
    layer.base_layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    x = torch.randn(2, 5, 64)
    general, short = _both_paths(layer, x, "autocast, all held bf16")
    assert seen == [(2, 5, 48), (2, 5, 48)] and torch.equal(short, general)


def _op_counts(layer: LoRALinear, x: torch.Tensor, grad: bool) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        layer(x)  # the first call without autograd makes the scaled copy of B that later calls reuse
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x)
    names = [event.name for event in prof.events()]
    return {op: names.count(op) for op in ("aten::_to_copy", "aten::mul", "aten::mul_", "aten::add", "aten::add_")}


def test_inference_path_casts_once_and_folds_the_scale():
    # What the shorter path is for: at batch 1 each operator call costs more than its arithmetic.
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=8.0)), "autocast, all held bf16")
    x = torch.randn(1, 5, 64)
    general = _op_counts(layer, x, grad=True)
    short = _op_counts(layer, x, grad=False)
    assert general["aten::_to_copy"] >= 2 and general["aten::mul"] == 1 and general["aten::add"] == 1
    assert short == {"aten::_to_copy": 1, "aten::mul": 0, "aten::mul_": 0, "aten::add": 0, "aten::add_": 1}


def test_dropout_still_acts_in_training_mode_without_autograd():
    layer = _nonzero_b(_layer(64, 48, r=4, alpha=8.0, dropout=0.5)).train()
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = layer(x)
        evaluated = layer.eval()(x)
    assert not torch.equal(dropped, evaluated)


def test_inference_path_traces_into_one_graph():
    # A user may torch.compile a loaded model for serving: the shorter path must not break the
    # graph (its copy of the scaled B is checked against a data pointer, which the tracer cannot read).
    layer = _held(_nonzero_b(_layer(64, 48, r=4, alpha=8.0)), "autocast, all held bf16")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("autocast", [False, True])
def test_inference_path_keeps_fp16_bits_where_outputs_are_subnormal(autocast):
    # Twice a subnormal fp16 product does not round as twice its rounding, so the scale of 2 must
    # act on the rounded branch, as the general path's multiply does (held in fp16, or cast there
    # by fp16 autocast); the add's alpha does, where a scale folded into B would not.
    layer = _nonzero_b(_layer(64, 48, r=4, alpha=8.0)).eval()
    with torch.no_grad():
        layer.lora_B.weight.mul_(1e-5)  # branch outputs around 1e-5: fp16 subnormals start at 6.1e-5
        layer.base_layer.weight.zero_()  # so that the frozen product's rounding does not absorb them
        layer.base_layer.bias.zero_()
    x = torch.randn(3, 7, 64)
    if not autocast:
        layer.half()
        x = x.half()
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        general = layer(x).detach()
        with torch.inference_mode():
            short = layer(x)
    assert short.dtype == torch.float16 and torch.equal(short, general)
