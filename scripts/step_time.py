"""Steady-state milliseconds per training step, lorafit's settings side by side in one process.

    PYTHONPATH=src python scripts/step_time.py --task mrpc --batch-size 16 --threads 2 \
        --settings plain,fast_dropout --out docs/performance/profile

Builds one model per setting as ``lorafit train`` does (embedded MiniLM, LoRA r=8 on
query/value, LoRA dropout 0.1 as in the bench, the precision `lorafit train` picks
(bf16 autocast with the frozen base in bf16 where the CPU multiplies bf16, else fp32), fused
AdamW, clipping), warms each up, then times rounds of ``--steps`` full steps (forward, backward,
clip, optimizer, scheduler) on batches of the median padded width, alternating the settings
round by round so that drift on a shared machine hits them alike. Prints the median ms a step
of each and its speed against the first. ``lorafit bench`` measures whole runs against the
baseline; this isolates the step, where one setting's effect is not diluted by start-up,
evaluation and batches of other widths. Settings: ``plain`` (lorafit's defaults),
``fast_dropout`` (``--fast-dropout``), ``pytorch`` (``--no-vectorised-masks``: PyTorch's mask
kernel and SDPA), ``masks_only`` (the vectorised masks without lorafit's attention and
dropout noise: the defaults before those came) and ``full_rows`` (``--no-cls-only-last-layer``: the
last layer computes every row), each optionally with parts of the model taken out to see
what they cost (``fast_dropout-attention``, ``plain-gelu``, ``plain-attention-gelu-layernorm``; see
``lorafit.bench.step.remove_part``), and optionally compiled (``plain@compile``: ``torch.compile``
in inductor's default mode with static shapes, as ``lorafit train --compile`` uses on a CPU; one
shape here, its compile time printed apart). ``--reuse-memory`` turns the process-wide setting of
that name on for all (off by default, as in ``lorafit train``). The script runs on the allocator it
is started with: ``LD_PRELOAD=libtcmalloc_minimal.so.4`` for tcmalloc, as ``lorafit train`` uses.

``--peak`` also measures the matmul peak at the model's layer shapes and this step's rows (before
the first round and after the last, the faster kept, as ``lorafit bench`` does) and prints each
setting's achieved FLOP/s as a share of it: the issue's count (``lorafit.bench.flops``), less
what a last layer cut to its first row does not compute, over the padded tokens of the step. A
setting with parts taken out is given the whole step's count, so its share is an upper bound
of what a step that skipped them could reach.

    PYTHONPATH=src python scripts/step_time.py --reuse-memory \
        --settings fast_dropout,fast_dropout-attention,fast_dropout-gelu,fast_dropout-layernorm
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lorafit import allocator, cpu_dropout, fastpath
from lorafit.bench.env import environment
from lorafit.bench.flops import (
    first_row_flops_per_token,
    layer_shapes,
    linear_flops_per_token,
    lora_flops,
    matmul_peak,
)
from lorafit.bench.step import PARTS, remove_part, training_step, typical_batches
from lorafit.config import make_config
from lorafit.models import load_tokenizer
from lorafit.setup import load_data

SETTINGS = ("plain", "fast_dropout", "masks_only", "pytorch", "full_rows")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="mrpc")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default="plain,fast_dropout")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="steps a round")
    p.add_argument("--reuse-memory", action="store_true")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto (default): what `lorafit train` picks here, bf16 where the CPU multiplies it, else fp32")
    p.add_argument("--peak", action="store_true", help="also the matmul peak and each setting's %% of it")
    p.add_argument("--out", help="folder for the result (<task>-b<batch>-step-time.json)")
    args = p.parse_args()
    settings = args.settings.split(",")
    unknown = [s for s in settings if (parts := s.removesuffix("@compile").split("-"))[0] not in SETTINGS
               or not set(parts[1:]) <= set(PARTS)]
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)} (choose from {', '.join(SETTINGS)}, "
                f"each optionally with one or more of -{' / -'.join(PARTS)}, and @compile)")

    torch.set_num_threads(args.threads)
    reuse = args.reuse_memory and allocator.reuse_freed_memory()
    precision = fastpath.resolve_precision(args.precision, torch.device("cpu"))
    cfg = make_config(task=args.task, batch_size=args.batch_size, precision=precision, lora_dropout=0.1,
                      max_train_samples=4096, progress=False, num_threads=args.threads)
    task = cfg.task_spec()
    data, _ = load_data(cfg, task, load_tokenizer(cfg.model))
    typical, width = typical_batches(cfg, data)
    steps, models, compile_seconds = {}, {}, {}
    for setting in settings:
        torch.manual_seed(0)
        name, compiled, _ = setting.partition("@compile")
        base, *parts = name.split("-")
        model, steps[setting] = training_step(
            cfg.replace(fast_dropout=base == "fast_dropout", vectorised_masks=base != "pytorch",
                        cls_only_last_layer=base != "full_rows"), task, data,
            vectorised_dropout=base != "masks_only")
        for part in parts:
            remove_part(model, part)
        models[setting] = model
        if compiled:  # in place, so that the step built above calls the compiled forward
            model.compile(dynamic=False)
            started = time.perf_counter()
            steps[setting](typical[0])
            compile_seconds[setting] = round(time.perf_counter() - started, 1)
            print(f"{setting}: first step (compiling) {compile_seconds[setting]} s")
        for i in range(3):  # warm-up
            steps[setting](typical[i % len(typical)])

    peaks = [_peak(models[settings[0]], args.batch_size * width, precision)] if args.peak else []
    times: dict[str, list[float]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings:
            started = time.perf_counter()
            for i in range(args.steps):
                steps[setting](typical[(r * args.steps + i) % len(typical)])
            times[setting].append((time.perf_counter() - started) / args.steps * 1e3)

    if args.peak:
        peaks.append(_peak(models[settings[0]], args.batch_size * width, precision))
    first = statistics.median(times[settings[0]])
    result = {"task": args.task, "batch_size": args.batch_size, "precision": precision, "padded_width": width,
              "threads": args.threads, "reuse_memory": reuse, "rounds": args.rounds, "steps_a_round": args.steps,
              "environment": environment(), "compile_seconds": compile_seconds, "ms_per_step": {}}
    if args.peak:
        result["peak_gflops"] = {"measured": [round(g, 1) for g in peaks], "used": round(max(peaks), 1)}
        result["gflop_per_step"] = {}
    for setting in settings:
        median = statistics.median(times[setting])
        result["ms_per_step"][setting] = {"median": round(median, 1), "min": round(min(times[setting]), 1),
                                          "max": round(max(times[setting]), 1)}
        share = ""
        if args.peak:
            gflop = _gflop_per_step(models[setting], args.batch_size, width, setting.partition("-")[0] != "full_rows")
            result["gflop_per_step"][setting] = round(gflop, 3)
            share = f"  {gflop / median * 1e3:6.0f} GFLOP/s = {100 * gflop / median * 1e3 / max(peaks):4.1f}% of peak"
        print(f"{setting:{max(22, *map(len, settings))}s} {median:7.1f} ms a step ({min(times[setting]):.1f}-{max(times[setting]):.1f})"
              f"  {first / median:.2f}x {settings[0]}{share}")
    if args.peak:
        print(f"matmul peak at {args.batch_size * width} rows, the model's shapes, {precision}: "
              f"{' and '.join(f'{g:.0f}' for g in peaks)} GFLOP/s (the faster used)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        malloc = result["environment"]["allocator"]  # LD_PRELOAD=libtcmalloc_minimal.so.4 to time tcmalloc
        name = (f"{args.task}-b{args.batch_size}-step-time{'-reuse-memory' if reuse else ''}"
                f"{'' if malloc == 'system' else '-' + malloc}{'' if args.threads == 2 else f'-{args.threads}thread'}"
                f"{'-compile' if compile_seconds else ''}.json")
        (Path(args.out) / name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def _peak(model: torch.nn.Module, rows: int, precision: str) -> float:
    """GFLOP/s of the model's layer shapes at ``rows`` rows, FLOP-weighted (``lorafit.bench.flops``)."""
    found = matmul_peak("cpu", (precision,), tokens=rows, shapes=layer_shapes(model))
    return next(r.gflops for r in found if r.shape == "model")


def _gflop_per_step(model: torch.nn.Module, batch: int, width: int, first_row_only: bool) -> float:
    """The issue's FLOP count of one step of ``batch`` x ``width`` tokens (as ``lorafit bench``
    counts it, but over padded tokens: the step computes them)."""
    vectorised = getattr(model.config, "_attn_implementation", None) == cpu_dropout.VECTORISED_ATTENTION
    extent = ("query" if vectorised else "past_attention") if first_row_only else None
    flops = lora_flops(linear_flops_per_token(model, "lora"), first_row_flops_per_token(model, "lora"), extent,
                       batch * width, batch)
    return flops / 1e9

if __name__ == "__main__":
    main()
