"""FLOP counting for LoRA training, and the machine's own matmul peak to compare it with.

The count (issue 9): 2 FLOP per multiply-add in every frozen and LoRA matmul of the encoder, in
the forward pass and in the input-gradient backward pass, plus the LoRA weight gradients; full
fine-tuning adds the frozen weights' gradients. Per token of an adapted ``in -> out`` layer of
rank r that is 4*in*out + 6*r*(in+out) for LoRA and 6*in*out for full fine-tuning. The head
(pooler, classifier) runs once per example, not per token, and the attention score products
(QK^T, AV: about 4% of the linear work at 50 tokens and hidden 384) are left out, so the
achieved FLOP/s this gives is a slight underestimate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

HEAD_NAMES = ("classifier", "pooler", "score")


def linear_flops_per_token(model: nn.Module, method: str = "lora") -> int:
    """Training FLOPs per token in the encoder's linear layers (see the module docstring).

    Works on a model built on the ``meta`` device, so counting costs no memory.
    """
    from lorafit.lora.layer import LoRALinear

    total = 0
    inside_lora: set[int] = set()
    for name, module in model.named_modules():
        if any(h in name.split(".") for h in HEAD_NAMES):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.update(id(m) for m in module.modules())
            n_in, n_out = module.in_features, module.out_features
            total += 4 * n_in * n_out + 6 * module.r * (n_in + n_out)
        elif isinstance(module, nn.Linear) and id(module) not in inside_lora:
            total += (6 if method == "full" else 4) * module.in_features * module.out_features
    return total


def first_row_flops_per_token(model: nn.Module, method: str = "lora") -> dict[str, int]:
    """Of :func:`linear_flops_per_token`, what the last layer computes for the first row alone
    under ``--cls-only-last-layer`` (:mod:`lorafit.head_row`): ``past_attention`` (its output
    projection and feed-forward block) and ``query`` (its query projection, cut where lorafit's
    CPU attention runs). Both 0 where the model's last layer is not cut.
    """
    from lorafit.head_row import last_layer

    last = last_layer(model)
    if last is None:
        return {"past_attention": 0, "query": 0}
    past = sum(linear_flops_per_token(part, method) for part in (last.attention.output, last.intermediate, last.output))
    query = getattr(last.attention.self, "query", None)
    return {"past_attention": past, "query": linear_flops_per_token(query, method) if query is not None else 0}


def lora_flops(per_token: int, first_row: dict[str, int], extent: str | None, tokens: float, examples: float) -> float:
    """LoRA training FLOPs of ``tokens`` tokens in ``examples`` examples (or per second, given rates):
    :func:`linear_flops_per_token` per token, less what a last layer cut to its first row
    computes once an example instead (``extent``: ``"past_attention"``, ``"query"`` where the
    attention asked with the first token's query alone too, or None where nothing was cut)."""
    once = first_row.get("past_attention", 0) + (first_row.get("query", 0) if extent == "query" else 0) if extent else 0
    return (per_token - once) * tokens + once * examples


def layer_shapes(model: nn.Module) -> dict[tuple[int, int], int]:
    """How often each (in, out) shape occurs among the encoder's per-token linear layers."""
    counts: dict[tuple[int, int], int] = {}
    for name, module in model.named_modules():
        head = any(h in name.split(".") for h in HEAD_NAMES)
        if isinstance(module, nn.Linear) and not head and not name.endswith(("lora_A", "lora_B")):
            key = (module.in_features, module.out_features)
            counts[key] = counts.get(key, 0) + 1
    return counts


@dataclass
class PeakResult:
    dtype: str
    shape: str  # "MxKxN" or "model" for the FLOP-weighted mix of the model's layer shapes
    gflops: float

    def as_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "shape": self.shape, "gflops": round(self.gflops, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _products(a: torch.Tensor, b: torch.Tensor, count: int) -> Callable[[], None]:
    """A call that computes ``a @ b`` ``count`` times.

    On a GPU the products are captured once in a CUDA graph and replayed: launched one at a time
    from Python, a product at a model's layer shape (a few microseconds of GPU work) takes as long
    as the host needs to launch it, and the "peak" would be the host's launch rate (the first GPU
    session measured 18.6 and 18.9 us for shapes 4x apart in FLOPs).
    """
    if a.device.type != "cuda":  # the CPU computes each product as it is called
        def run() -> None:
            for _ in range(count):
                torch.matmul(a, b)
        return run
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    side = torch.cuda.Stream(a.device)  # warm-up before capture, on a side stream (CUDA graph docs)
    side.wait_stream(torch.cuda.current_stream(a.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            torch.matmul(a, b, out=out)
    torch.cuda.current_stream(a.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(count):
            torch.matmul(a, b, out=out)
    return graph.replay


def _seconds(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, budget: float) -> float:
    """Median seconds of one (m x k) @ (k x n) product, warm-up excluded."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    _sync(device)
    start = time.perf_counter()
    torch.matmul(a, b)
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    # Enough products per sample that timer resolution and launch overhead do not matter
    # (capped: on a GPU each one is a node of the captured graph).
    per_sample = min(max(1, int(budget / 5 / once)), 4096)
    run = _products(a, b, per_sample)
    run()  # the first replay of a graph uploads it
    _sync(device)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        _sync(device)
        samples.append((time.perf_counter() - start) / per_sample)
    return statistics.median(samples)


def matmul_peak(
    device: str | torch.device = "cpu",
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    square: int = 2048,
    tokens: int | None = None,
    shapes: dict[tuple[int, int], int] | None = None,
    budget: float = 0.5,
) -> list[PeakResult]:
    """Measured matmul throughput: a large square product, and the model's own layer shapes.

    Args:
        device: Where to measure.
        dtypes: ``fp32`` and/or ``bf16``.
        square: Side of the large square product.
        tokens: Rows of the activation matrix at the model's shapes (tokens in a batch).
        shapes: ``layer_shapes(model)``; each (in, out) is timed as ``tokens x in @ in x out``
            and the mix is weighted by how often it occurs.
        budget: Rough seconds to spend per shape.
    """
    device = torch.device(device)
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    results = []
    for name in dtypes:
        dtype = table[name]
        secs = _seconds(square, square, square, dtype, device, budget)
        results.append(PeakResult(name, f"{square}x{square}x{square}", 2 * square**3 / secs / 1e9))
        if tokens and shapes:
            flops = seconds = 0.0
            for (n_in, n_out), count in sorted(shapes.items()):
                secs = _seconds(tokens, n_in, n_out, dtype, device, budget)
                results.append(PeakResult(name, f"{tokens}x{n_in}x{n_out}", 2 * tokens * n_in * n_out / secs / 1e9))
                flops += count * 2 * tokens * n_in * n_out
                seconds += count * secs
            results.append(PeakResult(name, "model", flops / seconds / 1e9))
    return results
