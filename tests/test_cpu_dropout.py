"""Dropout with cheap CPU masks: its statistics, its stream, its attention, and every architecture.

The masks are a run's record (a --fast-dropout run repeats only while they do), so their
function of the seed is pinned here, and the attention is checked against softmax attention
with the same mask, values and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafit import cpu_dropout
from lorafit.lora import LoRAConfig, inject_lora


@pytest.mark.parametrize("p", [0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_drops_p_of_the_elements_unbiased(p, dtype):
    torch.manual_seed(0)
    y = cpu_dropout.fast_dropout(torch.ones(400_003, dtype=dtype), p)  # not a multiple of 4
    dropped = (y == 0).float()
    # 400,003 Bernoulli(p) draws: 5 standard deviations are under 0.004.
    assert dropped.mean().item() == pytest.approx(p, abs=0.004)
    # Each of the four 16-bit words of a 64-bit draw decides its own element, each as often.
    for column in dropped[:400_000].view(-1, 4).mean(0):
        assert column.item() == pytest.approx(p, abs=0.008)
    keep = 1 - round(p * 65536) / 65536
    zero, scale = y.unique().tolist()
    assert zero == 0.0 and scale == pytest.approx(1 / keep, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert y.dtype == dtype and y.float().mean().item() == pytest.approx(1.0, abs=0.01)


def test_fast_dropout_mask_is_the_documented_function_of_one_draw():
    # The stream is part of a run's record: runs made with --fast-dropout repeat only while each
    # element's fate stays "its 16-bit SFC64 word >= threshold", seeded by one int64 draw.
    x = torch.randn(5, 7, 11)
    torch.manual_seed(7)
    y = cpu_dropout.fast_dropout(x, 0.1)
    torch.manual_seed(7)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4).view(np.int16)[: x.numel()].astype(np.int64)
    keep = torch.from_numpy(words >= round(0.1 * 65536) - 32768).view(x.shape)
    assert torch.equal(y, torch.where(keep, x * (65536 / (65536 - round(0.1 * 65536))), 0.0))


def test_fast_dropout_draws_from_the_default_generator_and_backpropagates_through_its_mask():
    x = torch.randn(6, 7, requires_grad=True)
    torch.manual_seed(3)
    a = cpu_dropout.fast_dropout(x, 0.5)
    b = cpu_dropout.fast_dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(cpu_dropout.fast_dropout(x, 0.5), a)  # a seed repeats it (and a resume restores it)
    assert not torch.equal(a, b)  # the generator moves on
    a.sum().backward()
    assert torch.equal(x.grad, torch.where(a != 0, torch.full_like(x, 2.0), 0.0))
    assert torch.equal(cpu_dropout.fast_dropout(x, 1.0), torch.zeros_like(x))


def test_use_fast_dropout_swaps_every_dropout_and_changes_nothing_in_eval():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=37, vocab_size=99))
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["query", "value"]).resolved("bert"))
    before = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    ids = torch.randint(0, 99, (3, 11))
    model.eval()
    expected = model(input_ids=ids).logits
    assert cpu_dropout.use_fast_dropout(model) == len(before)
    after = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {n: m.p for n, m in after.items()} == before  # the same places, the same p (SDPA reads .p)
    assert all(type(m) is cpu_dropout.FastDropout for m in after.values())
    assert "bert.encoder.layer.0.attention.self.query.lora_dropout" in after
    assert model.config._attn_implementation == cpu_dropout.FAST_ATTENTION  # attention's own dropout too
    assert torch.equal(model(input_ids=ids).logits, expected)
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    torch.manual_seed(1)
    assert torch.equal(model(input_ids=ids).logits, first)


def _tiny_encoder(kind: str) -> torch.nn.Module:
    import transformers

    config_class, model_class = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
        "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification),
    }[kind]
    torch.manual_seed(0)
    return model_class(config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    vocab_size=99, max_position_embeddings=64, pad_token_id=1))


def test_fast_attention_is_softmax_attention_with_the_fast_dropout_mask():
    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self.train()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False  # the second sequence has two padding tokens
    torch.manual_seed(7)
    out, _ = cpu_dropout.fast_attention(layer, q, k, v, keep, scaling=0.3, dropout=0.25)
    torch.manual_seed(7)
    mask = cpu_dropout.fast_dropout(torch.ones(2, 4, 5, 5), 0.25)  # the same draws: the same mask
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf")), dim=-1)
    expected = ((probs * mask) @ v).transpose(1, 2)
    assert out.shape == (2, 5, 4, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, (probs @ v).transpose(1, 2))  # dropout did drop
    v2 = v.clone()
    v2[1, :, 3:] = 1e4  # the values of masked keys do not count
    torch.manual_seed(7)
    assert torch.equal(cpu_dropout.fast_attention(layer, q, k, v2, keep, scaling=0.3, dropout=0.25)[0], out)


def test_the_boolean_mask_is_added_once_a_pass_and_gives_masked_fills_values_and_gradients_bit_for_bit():
    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self.train()
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False  # key padding, the only masking an encoder's batches have

    def attend(masked_fill: bool):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, 5, 8, requires_grad=True) for _ in range(3))
        torch.manual_seed(7)
        if masked_fill:  # the formulation the addend replaced
            scores = (q @ k.transpose(-1, -2)).float().mul_(0.3)
            scores = scores.masked_fill(~keep, torch.finfo(torch.float32).min)
            out = (cpu_dropout.fast_dropout(torch.softmax(scores, dim=-1), 0.25) @ v).transpose(1, 2).contiguous()
        else:
            out, _ = cpu_dropout.fast_attention(layer, q, k, v, keep, scaling=0.3, dropout=0.25)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
        return out, q.grad, k.grad, v.grad

    for ours, reference in zip(attend(False), attend(True)):
        assert torch.equal(ours, reference)
    # A query row with every key masked gets uniform weights, as in eager attention, not NaN.
    none = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    out, _ = cpu_dropout.fast_attention(layer, q, k, v, none, scaling=0.3, dropout=1e-9)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 4, 5, 8).transpose(1, 2))
    # One conversion for the mask every layer of a forward pass shares; a new mask gets its own.
    addend = cpu_dropout._additive_mask(keep)
    assert cpu_dropout._additive_mask(keep) is addend and addend.dtype == torch.float32
    assert torch.equal(addend == 0, keep)
    other = keep.clone()
    other[0, ..., 0] = False
    assert torch.equal(cpu_dropout._additive_mask(other) == 0, other)
    other[1, ..., 1] = False  # the same tensor changed in place is converted again
    assert torch.equal(cpu_dropout._additive_mask(other) == 0, other)


def test_fast_attention_is_sdpa_itself_outside_training_with_dropout():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, ..., 4:] = False
    for training, p in ((False, 0.0), (True, 0.0), (False, 0.1)):  # what SDPA is given, it gets
        layer.train(training)
        torch.manual_seed(3)
        out, _ = cpu_dropout.fast_attention(layer, q, k, v, keep, scaling=0.3, dropout=p)
        torch.manual_seed(3)
        assert torch.equal(out, sdpa_attention_forward(layer, q, k, v, keep, scaling=0.3, dropout=p)[0])


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2"])
def test_fast_dropout_trains_every_architecture_and_keeps_its_eval_logits(kind, tmp_path):
    model = _tiny_encoder(kind)
    ids = torch.randint(2, 99, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    cpu_dropout.use_fast_dropout(model)
    # DeBERTa computes its own attention (its dropout is one of the swapped modules).
    switched = model.config._attn_implementation == cpu_dropout.FAST_ATTENTION
    assert switched == (kind != "deberta-v2")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.save_pretrained(tmp_path)  # the registered name is not saved: it loads anywhere
    assert cpu_dropout.FAST_ATTENTION not in (tmp_path / "config.json").read_text()


def _qkv(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 9, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3)]


def _padding(lengths: list[int], width: int = 9) -> torch.Tensor:
    """Key padding as Transformers' SDPA mask gives it: [batch, 1, queries, keys], True = attend."""
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return keep[:, None, None, :].expand(len(lengths), 1, width, width)


def _attend(attention, layer, qkv, mask, autocast: bool, **kwargs):
    """Output and the gradients of q, k, v, from a fixed point of the default generator."""
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = attention(layer, *qkv, mask, **kwargs)
    grad = torch.arange(out.numel(), dtype=torch.float32).view(out.shape).sin().to(out.dtype)
    return (out, *torch.autograd.grad(out, qkv, grad), torch.rand(2))


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.float32, True), (torch.float32, False),
                                             (torch.bfloat16, False)])
@pytest.mark.parametrize("mask", ["padding", "none"])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_vectorised_attention_is_sdpas_math_path_bit_for_bit(dtype, autocast, mask, scaling, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorafit import mt_masks

    ran = []
    math_attention = cpu_dropout._math_attention
    monkeypatch.setattr(cpu_dropout, "_math_attention", lambda *a: ran.append(1) or math_attention(*a))
    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self.train()
    keep = _padding([9, 4, 1]) if mask == "padding" else None
    qkv = _qkv(dtype)
    with mt_masks.drawn_vectorised():
        ours = _attend(cpu_dropout.vectorised_attention, layer, qkv, keep, autocast, scaling=scaling, dropout=0.25)
        sdpa = _attend(sdpa_attention_forward, layer, qkv, keep, autocast, scaling=scaling, dropout=0.25)
    assert ran == [1]  # its own path, not SDPA handed on
    assert ours[0].shape == (3, 9, 4, 8) and ours[0].is_contiguous()
    for a, b in zip(ours, sdpa):  # output, three gradients, and the generator after
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _attend(sdpa_attention_forward, layer, qkv, keep, autocast, scaling=scaling)[0])


def test_vectorised_attention_hands_sdpa_what_it_would_not_reproduce(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ran = []
    math_attention = cpu_dropout._math_attention
    monkeypatch.setattr(cpu_dropout, "_math_attention", lambda *a: ran.append(1) or math_attention(*a))
    layer = _tiny_encoder("bert").bert.encoder.layer[0].attention.self
    no_key = _padding([9, 4, 1]).clone()
    no_key[2, :, 5] = False  # query 5 of the third sequence sees no key: SDPA gives it zeros, softmax NaN
    additive = torch.zeros(3, 1, 9, 9).masked_fill_(~_padding([9, 4, 1]), -1e4)
    cases = [(True, no_key, 0.25), (True, additive, 0.25), (False, _padding([9, 4, 1]), 0.25),
             (True, _padding([9, 4, 1]), 0.0)]
    for training, mask, p in cases:
        layer.train(training)
        qkv = _qkv(torch.float32)
        ours = _attend(cpu_dropout.vectorised_attention, layer, qkv, mask, False, scaling=0.3, dropout=p)
        sdpa = _attend(sdpa_attention_forward, layer, qkv, mask, False, scaling=0.3, dropout=p)
        for a, b in zip(ours, sdpa):
            assert torch.equal(a, b)
    assert ran == []
    assert torch.isfinite(ours[0]).all()
    # The mask every layer of a pass shares is checked and converted once; a new one gets its own.
    keep = _padding([9, 4, 1])
    converted = cpu_dropout._checked_mask(keep)
    assert cpu_dropout._checked_mask(keep) is converted
    assert torch.equal(converted == 0, keep) and torch.equal(converted.isneginf(), ~keep)
    assert cpu_dropout._checked_mask(no_key) is False and cpu_dropout._checked_mask(None) is None
    changed = keep.clone()
    assert torch.equal(cpu_dropout._checked_mask(changed), converted)
    changed[0, ..., 8] = False  # the same tensor changed in place is converted again
    assert torch.equal(cpu_dropout._checked_mask(changed) == 0, changed)
    changed[1, ..., :] = False  # and checked again: its second sequence now sees no key
    assert cpu_dropout._checked_mask(changed) is False
    with torch.inference_mode():  # no version counter to go by: converted every time
        frozen = _padding([9, 4, 1])
        first = cpu_dropout._checked_mask(frozen)
        assert torch.equal(first == 0, frozen) and cpu_dropout._checked_mask(frozen) is not first


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2"])
def test_use_vectorised_dropout_changes_no_bit_of_training_or_evaluation(kind, tmp_path):
    from lorafit import mt_masks

    ids = torch.randint(2, 99, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    results = {}
    for swapped in (False, True):
        model = _tiny_encoder(kind)
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["query", "value"]
                                      if kind != "deberta-v2" else ["query_proj", "value_proj"]).resolved(kind))
        dropouts = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
        if swapped:
            assert cpu_dropout.use_vectorised_dropout(model) == dropouts
            assert all(type(m) is cpu_dropout.VectorisedDropout
                       for m in model.modules() if isinstance(m, torch.nn.Dropout))
            # DeBERTa computes its own attention (its dropout is one of the swapped modules).
            switched = model.config._attn_implementation == cpu_dropout.VECTORISED_ATTENTION
            assert switched == (kind != "deberta-v2")
        model.eval()
        with torch.inference_mode():  # as lorafit evaluates: its masks are inference tensors
            logits = model(input_ids=ids, attention_mask=mask).logits
        model.train()
        torch.manual_seed(1)
        with mt_masks.drawn_vectorised(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        results[swapped] = [logits, loss, *(p.grad for p in model.parameters() if p.grad is not None)]
    assert len(results[True]) == len(results[False]) > 2
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)
    model.save_pretrained(tmp_path)  # the registered name is not saved: it loads anywhere
    assert cpu_dropout.VECTORISED_ATTENTION not in (tmp_path / "config.json").read_text()


def test_a_pytorch_whose_sdpa_differs_keeps_sdpa_with_a_warning(monkeypatch):
    assert cpu_dropout._agrees_with_sdpa()
    monkeypatch.setattr(cpu_dropout, "_agreement", [False])  # as on a PyTorch whose math path differs
    model = _tiny_encoder("bert")
    with pytest.warns(UserWarning, match="SDPA stays"):
        assert cpu_dropout.use_vectorised_dropout(model) > 0
    assert model.config._attn_implementation == "sdpa"
    assert all(type(m) is cpu_dropout.VectorisedDropout for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_the_check_of_the_attention_leaves_the_default_generator_where_it_was(monkeypatch):
    monkeypatch.setattr(cpu_dropout, "_agreement", [])
    torch.manual_seed(4)
    expected = torch.rand(3)
    torch.manual_seed(4)
    assert cpu_dropout._agrees_with_sdpa() and cpu_dropout._agreement == [True]
    assert torch.equal(torch.rand(3), expected)
