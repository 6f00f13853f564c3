"""``--compile-mode step-graph``: each whole training step as one CUDA graph per batch shape.

The bookkeeping around the graphs (a shape's first step as it is, the input buffers each batch
is copied into, the learning rate on the device for the scheduler to fill) runs on the CPU with
``capture=False`` and must train bit for bit as the plain loop does. The capture itself needs a
GPU: the ``gpu`` test below runs in scripts/gpu_check.sh (``pytest -m gpu``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lorafit import step_graph
from lorafit.config import make_config
from lorafit.data.batching import collate
from lorafit.errors import LorafitError


def _tiny_run(device: str, dropout: float = 0.1):
    """A tiny BERT with LoRA, its optimizer, schedule and accelerator, as train() sets them up."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorafit.distributed import make_accelerator
    from lorafit.lora import LoRAConfig, inject_lora
    from lorafit.setup import linear_schedule, make_optimizer

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99, num_labels=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], dropout=dropout).resolved("bert"))
    cfg = make_config(task="rte", learning_rate=5e-3, max_grad_norm=0.5)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = linear_schedule(optimizer, 2, 8)
    accelerator = make_accelerator("no", torch.device(device))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer, scheduler, accelerator, trainable, cfg


BUCKETS = (16, 24)


def _data(n: int):
    """``n`` batches of 4 examples, of two padded widths interleaved (buckets 16 and 24)."""
    from lorafit.data import Encoded

    rng = np.random.default_rng(0)
    lengths = np.tile([14, 14, 9, 12, 20, 7, 18, 11], n // 2)
    ids = rng.integers(1, 99, size=int(lengths.sum())).astype(np.int32)
    data = Encoded(input_ids=ids, offsets=np.concatenate([[0], np.cumsum(lengths)]), token_type_ids=None,
                   labels=rng.integers(0, 2, size=len(lengths)), split="train", max_length=24,
                   is_regression=False, cache_key="test")
    return data, [np.arange(4 * i, 4 * i + 4) for i in range(n)]


def _train(device: str, use_graphs: bool, capture: bool, steps: int = 8, dropout: float = 0.1, compiled: bool = False):
    """The training loop's two branches (lorafit.train): plain, or through StepGraphs."""
    from lorafit import fastpath
    from lorafit.train import _accumulate, _clip_and_step, _train_step

    model, optimizer, scheduler, accelerator, trainable, cfg = _tiny_run(device, dropout)
    step_model = fastpath.compile_model(model, "default", 4) if compiled else model
    graphs = None
    if use_graphs:
        step_graph.device_learning_rates(optimizer, torch.device(device))
        graphs = step_graph.StepGraphs(functools.partial(_train_step, step_model, accelerator, optimizer, trainable,
                                                         cfg.max_grad_norm), torch.device(device), capture=capture)
    data, batches = _data(steps)
    torch.manual_seed(1)  # the dropout masks: the same stream for both loops
    losses = []
    for batch in batches:
        if graphs is not None:
            loss = graphs(collate(data, batch, 0, length_buckets=BUCKETS))
        else:
            loss = _accumulate(step_model, accelerator, data, [batch], 0, BUCKETS)
            _clip_and_step(accelerator, optimizer, trainable, cfg.max_grad_norm)
        losses.append(loss.clone())
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, graphs, torch.stack(losses)


def test_the_step_graph_bookkeeping_trains_bit_for_bit_as_the_plain_loop():
    plain, _, _, plain_losses = _train("cpu", use_graphs=False, capture=False)
    model, optimizer, graphs, losses = _train("cpu", use_graphs=True, capture=False)
    assert torch.equal(losses, plain_losses)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    # Two widths: each ran once as it is, then from its own input buffers.
    assert sorted(k[0][1][1] for k in graphs.graphs) == [16, 24] and len(graphs.seen) == 2
    # The schedule reached the optimizer through the device tensor (8 steps of a warm-up 2, total 8).
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert optimizer.param_groups[0]["lr"].item() == pytest.approx(0.0)


def test_a_learning_rate_frozen_into_the_step_would_train_differently():
    """What device_learning_rates prevents: with float rates a captured AdamW keeps its first rate.
    Here the schedule is skipped for one run: the weights must differ, so the test above can fail."""
    from lorafit.train import _train_step

    model, optimizer, _scheduler, accelerator, trainable, cfg = _tiny_run("cpu")
    step_graph.device_learning_rates(optimizer, torch.device("cpu"))
    graphs = step_graph.StepGraphs(functools.partial(_train_step, model, accelerator, optimizer, trainable,
                                                     cfg.max_grad_norm), torch.device("cpu"), capture=False)
    data, batches = _data(8)
    torch.manual_seed(1)
    for batch in batches:
        graphs(collate(data, batch, 0, length_buckets=BUCKETS))
        optimizer.zero_grad(set_to_none=True)  # no scheduler.step()
    scheduled, _, _, _ = _train("cpu", use_graphs=True, capture=False)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), scheduled.parameters()))


def test_checkpoints_keep_plain_float_rates():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3, fused=True)
    step_graph.device_learning_rates(optimizer, torch.device("cpu"))
    state = step_graph.host_learning_rates(optimizer.state_dict())
    assert state["param_groups"][0]["lr"] == pytest.approx(1e-3) and isinstance(state["param_groups"][0]["lr"], float)
    assert state["param_groups"][0]["capturable"] is True
    # Resumed by a run of any mode: the float is what load_state_dict puts back.
    again = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=5.0)
    again.load_state_dict(state)
    assert again.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_step_graph_refuses_what_one_captured_step_cannot_do(tmp_path):
    from lorafit.train import train

    with pytest.raises(LorafitError, match="--compile-mode step-graph captures CUDA graphs: it needs --device cuda"):
        train(make_config(task="rte", compile=True, compile_mode="step-graph", device="cpu",
                          output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    cuda = torch.device("cuda")
    with pytest.raises(LorafitError, match="fp16's loss scaling"):
        step_graph.check_supported(cuda, "fp16", 1, 1)
    with pytest.raises(LorafitError, match="it needs --grad-accum 1, got 2"):
        step_graph.check_supported(cuda, "bf16", 2, 1)
    with pytest.raises(LorafitError, match="runs in one process"):
        step_graph.check_supported(cuda, "bf16", 1, 2)
    step_graph.check_supported(cuda, "bf16", 1, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_captured_steps_train_as_the_plain_loop_on_a_gpu(dropout):
    """On a GPU, through inductor's kernels as --compile-mode step-graph runs them: the replays give
    the plain loop's losses and weights. Without dropout the arithmetic is the same; with it, the
    masks come from the same generator, whose offsets each replay advances as eager steps do."""
    plain, _, _, plain_losses = _train("cuda", use_graphs=False, capture=False, dropout=dropout, compiled=True)
    model, _, graphs, losses = _train("cuda", use_graphs=True, capture=True, dropout=dropout, compiled=True)
    assert len(graphs.graphs) == 2
    torch.testing.assert_close(losses, plain_losses, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
