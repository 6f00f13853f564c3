"""Where a GPU training step's time goes: host syncs, CPU vs GPU time per step, CUDA graphs.

    PYTHONPATH=src python scripts/gpu_diagnose.py --out "$OUT"       # on the GPU machine
    PYTHONPATH=src python scripts/gpu_diagnose.py --device cpu --model minilm --steps 4 --warmup 1   # a dry run here

One model (default: roberta-base's shape with random weights, LoRA r=8 on query/value, dropout 0.1,
bf16 autocast, frozen base in bf16, fused AdamW, clipping: what ``lorafit bench`` trains), every
batch padded to one width, the same batches for every side. It reports, side by side in one run:

* ``lorafit eager``: ms per step, timed over ``--steps`` steps with one synchronisation at the end;
* ``host syncs``: each place that synchronised the host with the GPU during two steps
  (``torch.cuda.set_sync_debug_mode``): one per step is enough to stop the host running ahead;
* ``profile``: the top operators by self CPU time, and CPU vs GPU time per step: a step whose
  CPU time exceeds its GPU time is host-bound, which CUDA graphs are meant to remove;
* ``lorafit compiled``: the same steps through ``torch.compile(mode=reduce-overhead)``, with
  Dynamo's graph breaks, recompiles and CUDA-graph skip reasons logged;
* ``lorafit step-graph``: the whole step (compiled forward, backward, clipping, AdamW) captured as
  one CUDA graph (``--compile-mode step-graph``, lorafit.step_graph); with ``--skip compile`` the
  same bookkeeping over the eager model (and on a CPU, where nothing is captured, a dry run);
* ``peft eager``: the same model wrapped by PEFT in a plain loop, the measured anchor's setting.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from lorafit import fastpath, step_graph
from lorafit.config import make_config
from lorafit.data import collate
from lorafit.distributed import make_accelerator
from lorafit.models import load_tokenizer
from lorafit.setup import build_model, linear_schedule, load_data, make_optimizer
from lorafit.train import _accumulate, _train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches: list[np.ndarray], device: torch.device) -> float:
    """Milliseconds per step over ``batches``, one synchronisation at each end."""
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return 1e3 * (time.perf_counter() - start) / len(batches)


def host_syncs(step, batches: list[np.ndarray], device: torch.device) -> list[str]:
    """Where the host waited for the GPU during ``batches`` (file:line of the Python caller)."""
    if device.type != "cuda":
        return ["(no GPU: nothing to synchronise with)"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch)
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Named from site-packages on, as in a traceback but without the machine's own prefix.
    places = collections.Counter(f"{w.filename.rsplit('site-packages/', 1)[-1]}:{w.lineno}"
                                 for w in caught if "synchroniz" in str(w.message))
    return [f"{n / len(batches):.1f} per step  {place}" for place, n in places.most_common(12)] or ["none"]


def profiled(step, batches: list[np.ndarray], device: torch.device, rows: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        sync(device)
    events = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in events) / 1e3 / len(batches)
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / len(batches)
    head = f"self CPU {cpu:.2f} ms/step, self GPU {gpu:.2f} ms/step\n"
    return head + events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="random:roberta-base")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=128, help="every batch is padded to this width")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--skip", default="", help="comma-separated sides to leave out: compile,step_graph,peft "
                   "(compile: no compilation, so step_graph captures the eager model)")
    p.add_argument("--out", help="folder for gpu_diagnose.txt")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = make_config(model=args.model, task="sst2", batch_size=args.batch_size, precision="bf16", lora_dropout=0.1,
                      max_train_samples=args.batch_size * (args.steps + args.warmup), progress=False,
                      length_buckets=[args.length], max_length=args.length, device=args.device)
    task = cfg.task_spec()
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data, _ = load_data(cfg, task, tokenizer)
    order = [np.arange(i, i + args.batch_size) for i in range(0, len(data) - args.batch_size + 1, args.batch_size)]
    warm, steps = order[: args.warmup], order[args.warmup : args.warmup + args.steps]
    report: list[str] = [json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda"
                                     else None, "model": args.model, "batch_size": args.batch_size, "length": args.length,
                                     "steps": len(steps), "torch": torch.__version__})]

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    def lorafit_side(compiled: bool, whole_step: bool = False):
        model = build_model(cfg, task)
        fastpath.cast_frozen_linears(model)
        optimizer = make_optimizer(model, cfg)
        scheduler = linear_schedule(optimizer, 10, 1000)
        accelerator = make_accelerator("bf16", device)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        model.train()
        # lorafit's own choice of mode (``--compile-mode auto``): CUDA graphs on a GPU; under a
        # step graph, inductor's kernels alone (the graph is the step's).
        mode = "default" if whole_step else fastpath.compile_mode("auto", device)
        step_model = fastpath.compile_model(model, mode, 2) if compiled else model
        trainable = [q for q in model.parameters() if q.requires_grad]
        if whole_step:
            step_graph.device_learning_rates(optimizer, device)
            graphs = step_graph.StepGraphs(functools.partial(
                _train_step, step_model, accelerator, optimizer, trainable, cfg.max_grad_norm), device)

            def graph_step(batch: np.ndarray) -> None:
                graphs(collate(data, batch, pad_id, length_buckets=(args.length,)))
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            return graph_step

        def step(batch: np.ndarray) -> None:
            _accumulate(step_model, accelerator, data, [batch], pad_id, (args.length,))
            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def diagnose(name: str, step, warm_up: str | None = None) -> None:
        """Warm ``step`` up on the warm-up batches, then time it, list its host syncs and profile it."""
        start = time.perf_counter()
        for batch in warm:
            step(batch)
        sync(device)
        took = f"warm-up ({warm_up}) {time.perf_counter() - start:.1f} s, then " if warm_up else ""
        say(f"\n== lorafit {name}: {took}{timed(step, steps, device):.2f} ms/step")
        say("host syncs:\n  " + "\n  ".join(host_syncs(step, steps[:2], device)))
        say(f"profile (lorafit {name}):\n" + profiled(step, steps[:10], device, args.rows))

    diagnose("eager", lorafit_side(compiled=False))
    if "compile" not in skip:
        torch._logging.set_logs(graph_breaks=True, recompiles=True, perf_hints=True)
        diagnose("compiled", lorafit_side(compiled=True), "compilation")
        torch._logging.set_logs()
    if "step_graph" not in skip:  # the first warm-up step compiles, the second captures
        diagnose("step-graph", lorafit_side(compiled="compile" not in skip, whole_step=True), "compilation, capture")

    if "peft" not in skip:
        from peft import LoraConfig, get_peft_model

        from lorafit.models import load_model

        base = load_model(cfg.model, task.num_labels)[0].to(device)
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                                target_modules=["query", "value"]))
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-4, fused=True)
        model.train()

        def peft_step(batch: np.ndarray) -> None:
            inputs = fastpath.to_device(collate(data, batch, pad_id, length_buckets=(args.length,)), device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for batch in warm:
            peft_step(batch)
        say(f"\n== peft eager (plain loop): {timed(peft_step, steps, device):.2f} ms/step")
        say("host syncs:\n  " + "\n  ".join(host_syncs(peft_step, steps[:2], device)))

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_diagnose.txt").write_text("\n".join(report) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
