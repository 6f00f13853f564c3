"""The whole training step as one CUDA graph per batch shape (``--compile-mode step-graph``).

``reduce-overhead`` lets torch.compile replay the forward and the backward as two CUDA graphs,
but what lies around them still runs from Python, kernel by kernel: Dynamo's guard check, the
autograd engine between the two graphs, gradient clipping (a norm over every gradient, then a
scale) and AdamW. On roberta-base's shape at batch 16 that left 6.6 ms of host time per step
for 4.2 ms of GPU work (docs/performance/journal.md, "The whole step as one CUDA graph"): the GPU
waited on Python. Here the compiled forward, the backward, clipping and the optimizer step are
captured together, once per batch shape (PyTorch's "whole-network capture", ``torch.cuda.graph``),
and a step is a copy of the batch into the graph's input buffers and one replay.

What capture needs, and how lorafit provides it:

* the first step of each shape runs normally (on a side stream, as the CUDA graph docs ask):
  it compiles, and its optimizer step creates AdamW's state outside any graph, so every graph
  updates the same moments;
* gradients are ``None`` at each capture (the loop's ``zero_grad(set_to_none=True)``): the
  backward inside the graph then writes fresh gradients, in the graph's own memory, at every
  replay instead of adding to the last step's;
* AdamW is ``capturable`` (its step count lives on the device) and each group's learning rate is
  a device tensor, which the scheduler fills before each replay; as plain floats the rates would
  be frozen into the graph at capture;
* nothing in the step waits for the GPU (clipping and the loss stay on the device), so the host
  queues the next step while the GPU runs this one.

Each shape's graph keeps its own memory pool, so no replay can overwrite another shape's
buffers; the cost is one step's activations per bucket of GPU memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorafit import fastpath
from lorafit.errors import LorafitError

Batch = dict[str, torch.Tensor]


def check_supported(device: torch.device, precision: str, grad_accum: int, num_processes: int) -> None:
    """Refuse, naming the flag, what one captured step per batch cannot do."""
    if device.type != "cuda":
        raise LorafitError("--compile-mode step-graph captures CUDA graphs: it needs --device cuda "
                           "(on a CPU use --compile-mode default)")
    if precision == "fp16":  # the loss scaler decides on the host whether to skip each step
        raise LorafitError("--compile-mode step-graph cannot capture fp16's loss scaling: use --precision bf16 or fp32")
    if grad_accum != 1:
        raise LorafitError(f"--compile-mode step-graph captures one batch per optimizer step: "
                           f"it needs --grad-accum 1, got {grad_accum}")
    if num_processes != 1:
        raise LorafitError("--compile-mode step-graph runs in one process; with several, use --compile-mode reduce-overhead")


def device_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make each group's learning rate a device tensor and the optimizer capturable.

    The scheduler then updates the rate in place (``fill_``), which a replayed graph reads.
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["capturable"] = True


def host_learning_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with plain float rates, so a checkpoint resumes in any mode."""
    groups = [{**g, "lr": float(g["lr"])} if isinstance(g["lr"], torch.Tensor) else g for g in state["param_groups"]]
    return {**state, "param_groups": groups}


@dataclass
class _Captured:
    inputs: Batch  # the buffers the step reads: each batch is copied in before a replay
    replay: Callable[[], torch.Tensor]  # runs the step on them; returns the loss


class StepGraphs:
    """Runs a training step, capturing it as a CUDA graph the second time a batch shape comes.

    Args:
        step: Forward, backward, clipping and optimizer step on one batch already on the
            device; returns the detached loss. Gradients must be ``None`` when it is called.
        device: Where the step runs.
        capture: Capture CUDA graphs (on a GPU). Without, the same buffers and bookkeeping run
            the step directly: what the CPU tests check.
    """

    def __init__(self, step: Callable[[Batch], torch.Tensor], device: torch.device, capture: bool = True) -> None:
        self.step, self.device = step, device
        self.capture = capture and device.type == "cuda"
        self.seen: set[tuple[Any, ...]] = set()
        self.graphs: dict[tuple[Any, ...], _Captured] = {}

    def __call__(self, batch: Batch) -> torch.Tensor:
        """One training step on ``batch`` (host tensors, pinned on a GPU); returns its loss on the device."""
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))
        if self.capture:  # pinned, so that the copies below do not wait for the GPU
            batch = {k: t.pin_memory() for k, t in batch.items()}
        if key not in self.graphs:
            if key not in self.seen:  # a shape's first step runs as it is; its second is captured
                self.seen.add(key)
                return self._first(batch)
            self.graphs[key] = self._record({k: torch.empty(t.shape, dtype=t.dtype, device=self.device)
                                              for k, t in batch.items()})
        captured = self.graphs[key]
        for name, tensor in batch.items():
            captured.inputs[name].copy_(tensor, non_blocking=True)
        return captured.replay()

    def _first(self, batch: Batch) -> torch.Tensor:
        inputs = fastpath.to_device(batch, self.device)
        if not self.capture:
            return self.step(inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self.step(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _record(self, inputs: Batch) -> _Captured:
        if not self.capture:
            return _Captured(inputs, lambda: self.step(inputs))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels: nothing runs until a replay
            loss = self.step(inputs)

        def replay() -> torch.Tensor:
            graph.replay()
            return loss
        return _Captured(inputs, replay)
