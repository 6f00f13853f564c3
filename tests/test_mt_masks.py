"""PyTorch's dropout masks from the vectorised kernel: the same numbers, the same stream after them.

Every check compares against PyTorch's own ``bernoulli_`` kernel, run outside the block with the
same generator state: the masks must be equal bit for bit, and so must the numbers drawn next.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit import mt_masks

SHAPES = {
    "contiguous": lambda dtype: torch.empty(37, 29, dtype=dtype),
    "transposed": lambda dtype: torch.empty(7, 5, dtype=dtype).t(),
    "strided": lambda dtype: torch.empty(6, 10, dtype=dtype)[:, ::2],
    "sliced, permuted": lambda dtype: torch.empty(6, 8, 10, dtype=dtype).permute(1, 2, 0)[:, 1:5],
    "channels last": lambda dtype: torch.empty(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last),
    "scalar": lambda dtype: torch.empty((), dtype=dtype),
    "empty": lambda dtype: torch.empty(0, 3, dtype=dtype),
}


def _both(make, p: float, draws_before: int, generator: torch.Generator | None = None):
    """PyTorch's mask and the vectorised one from the same state, and three numbers drawn after each."""
    results = []
    for vectorised in (False, True):
        torch.manual_seed(11)
        if generator is not None:
            generator.manual_seed(12)
        torch.rand(draws_before, generator=generator)  # any position in the 624-word state, odd ones too
        with mt_masks.drawn_vectorised(vectorised) as on:
            assert on == vectorised
            mask = make().bernoulli_(p, generator=generator)
        results.append((mask, torch.rand(3, generator=generator), torch.rand(3)))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", SHAPES)
def test_masks_and_the_stream_after_them_equal_pytorchs(dtype, shape):
    for p in (0.9, 0.1, 1 / 3, 0.0, 1.0):
        for draws_before in (0, 1, 623):
            (mask, after, _), (ours, ours_after, _) = _both(lambda: SHAPES[shape](dtype), p, draws_before)
            assert ours.dtype == dtype and ours.stride() == mask.stride()
            assert torch.equal(ours, mask), (p, draws_before)
            assert torch.equal(ours_after, after), (p, draws_before)


@pytest.mark.parametrize("numel", [1, 311, 312, 9983, 9984, 9985, 60_001])
def test_masks_across_many_states_equal_pytorchs(numel):
    # 9,984 elements fill the kernel's 32 states ahead: these sizes end before, at and after that.
    for draws_before in (0, 5, 622, 623, 624):
        (mask, after, _), (ours, ours_after, _) = _both(lambda: torch.empty(numel), 0.9, draws_before)
        assert torch.equal(ours, mask) and torch.equal(ours_after, after), draws_before


def test_a_generator_of_its_own_advances_and_the_default_one_does_not():
    generator = torch.Generator()
    (mask, after, default_after), (ours, ours_after, ours_default_after) = _both(
        lambda: torch.empty(500), 0.5, 7, generator)
    assert torch.equal(ours, mask) and torch.equal(ours_after, after)
    assert torch.equal(ours_default_after, default_after)


def test_dropout_and_attention_dropout_train_as_with_pytorchs_kernel():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16, requires_grad=True)
    q, k, v = (torch.randn(2, 4, 9, 8, requires_grad=True) for _ in range(3))
    layer = torch.nn.Dropout(0.1).train()
    outputs, grads = [], []
    for vectorised in (False, True):
        torch.manual_seed(5)
        with mt_masks.drawn_vectorised(vectorised):
            out = (layer(x).sum(), F.dropout(x, 0.3).sum(),
                   F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).square().sum())
        outputs.append(torch.stack(out))
        grads.append(torch.autograd.grad(sum(out), (x, q, k, v)))
    assert torch.equal(outputs[0], outputs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


DROPOUT_INPUTS = {**{k: v for k, v in SHAPES.items() if k not in ("scalar", "empty")},
                  "activation": lambda dtype: torch.empty(8, 53, 384, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", DROPOUT_INPUTS)
def test_dropout_writing_the_scaled_noise_at_once_is_f_dropout_bit_for_bit(dtype, shape):
    x = DROPOUT_INPUTS[shape](dtype).normal_().requires_grad_()
    grad = torch.randn(x.shape).to(dtype)
    for p in (0.1, 0.25, 1 / 3, 0.9):
        results = []
        for ours in (False, True):
            torch.manual_seed(3)
            with mt_masks.drawn_vectorised():
                out = mt_masks.dropout(x, p) if ours else F.dropout(x, p, training=True)
            results.append((out, *torch.autograd.grad(out, x, grad), torch.rand(3)))
        for a, b in zip(*results):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert torch.equal(a, b), (p, shape)
    kept = results[1][0] != 0
    assert 0 < kept.float().mean() < 1  # some dropped, some kept: the case is not trivial


def test_dropout_writes_its_noise_only_inside_a_block_and_for_a_proper_probability(monkeypatch):
    written = []
    kernel = mt_masks._fill
    monkeypatch.setattr(mt_masks, "_fill", lambda *a: written.append(a[3]) or kernel(*a))
    x = torch.randn(50, 7)
    for p in (0.0, 1.0):  # F.dropout's own cases: the input itself, zeros
        with mt_masks.drawn_vectorised():
            assert torch.equal(mt_masks.dropout(x, p), F.dropout(x, p, training=True))
    torch.manual_seed(1)
    outside = mt_masks.dropout(x, 0.2)  # no block open: F.dropout and PyTorch's kernel
    torch.manual_seed(1)
    assert torch.equal(outside, F.dropout(x, 0.2, training=True))
    assert written == []
    with mt_masks.drawn_vectorised():
        mt_masks.dropout(x, 0.2)
    assert written == [torch.ones(1).div_(0.8).view(torch.int32).item()]  # 1 / 0.8 as div_ rounds it
    assert mt_masks._scaled_one(torch.complex64, 0.8) is None  # a dtype it does not write: F.dropout's path


def _cpu_kernel() -> str:
    dump = torch._C._dispatch_dump("aten::bernoulli_.float")
    return next(line for line in dump.splitlines() if line.startswith("CPU:"))


def test_the_kernel_is_lorafits_only_inside_the_outermost_block():
    pytorchs = _cpu_kernel()
    assert "mt_masks" not in pytorchs
    with mt_masks.drawn_vectorised():
        assert "mt_masks" in _cpu_kernel()
        with mt_masks.drawn_vectorised():
            assert "mt_masks" in _cpu_kernel()
        assert "mt_masks" in _cpu_kernel()  # an inner block's end leaves the outer one's kernel
    assert _cpu_kernel() == pytorchs
    with pytest.raises(KeyError), mt_masks.drawn_vectorised():
        raise KeyError("a failing step")
    assert _cpu_kernel() == pytorchs
    with mt_masks.drawn_vectorised(False) as on:
        assert not on and _cpu_kernel() == pytorchs


def test_without_numba_pytorchs_kernel_stays(monkeypatch):
    monkeypatch.setattr(mt_masks, "_kernels", False)  # as when `import numba` failed
    assert not mt_masks.available()
    with mt_masks.drawn_vectorised() as on:
        assert not on
        assert "mt_masks" not in _cpu_kernel()


def test_the_check_before_first_use_passes_here_and_a_failed_one_keeps_pytorchs_kernel(monkeypatch):
    assert mt_masks._agrees_with_pytorch()
    monkeypatch.setattr(mt_masks, "_kernels", None)  # not loaded yet in this process
    monkeypatch.setattr(mt_masks, "_agrees_with_pytorch", lambda: False)  # as on a PyTorch whose sampler differs
    with pytest.warns(UserWarning, match="PyTorch's own stays"):
        assert not mt_masks.available()
    with mt_masks.drawn_vectorised() as on:
        assert not on and "mt_masks" not in _cpu_kernel()


@pytest.mark.parametrize("p", [1.5, -0.1, float("nan")])
def test_a_bad_probability_gets_pytorchs_error(p):
    with pytest.raises(RuntimeError) as expected:
        torch.empty(3).bernoulli_(p)
    with mt_masks.drawn_vectorised(), pytest.raises(RuntimeError) as ours:
        torch.empty(3).bernoulli_(p)
    assert str(ours.value).splitlines()[0] == str(expected.value).splitlines()[0]
