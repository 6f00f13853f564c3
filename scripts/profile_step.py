"""Profile lorafit's training step (CPU, torch.profiler), as docs/performance.md reports it.

    PYTHONPATH=src python scripts/profile_step.py --task sst2 --batch-size 32 --out docs/performance/profile

Builds the run as ``lorafit train`` does (embedded MiniLM, LoRA r=8 on query/value, dropout 0.1,
the precision `lorafit train` picks
(bf16 autocast with the frozen base in bf16 where the CPU multiplies bf16, else fp32), fused AdamW, clipping), trains a few warm-up steps,
then profiles ``--steps`` steps of the loop's own code (``lorafit.train._accumulate``, clip,
optimizer, scheduler, zero_grad). Writes the operator table sorted by self CPU time. Shares, not
seconds, are what to read: on a shared machine the absolute times are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from lorafit import fastpath
from lorafit.bench.step import training_step, typical_batches
from lorafit.config import make_config
from lorafit.models import load_tokenizer
from lorafit.setup import load_data


def add_ranges(model: torch.nn.Module) -> None:
    """Name the forward of each LoRA piece and each encoder block in the profile (forward hooks).

    The LoRA layer's own work (the scaling multiply and the add) is its total less its children.
    """
    from lorafit.lora import lora_layers

    def ranged(module: torch.nn.Module, name: str) -> None:
        def pre(*_):
            module._range = record_function(name)
            module._range.__enter__()

        def post(*_):
            module._range.__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for _, layer in lora_layers(model):
        ranged(layer, "lora.layer")
        for child in ("base_layer", "lora_dropout", "lora_A", "lora_B"):
            ranged(getattr(layer, child), f"lora.{child}")
    import lorafit.train

    collate = lorafit.train.collate

    def ranged_collate(*args, **kwargs):
        with record_function("lorafit.collate"):
            return collate(*args, **kwargs)

    lorafit.train.collate = ranged_collate
    encoder = getattr(model, model.base_model_prefix, model)
    masks = getattr(type(encoder), "_create_attention_masks", None)  # Transformers 5's BERT mask builder
    if masks is not None:
        def ranged_masks(*args, **kwargs):
            with record_function("model.attention_mask"):
                return masks(*args, **kwargs)

        type(encoder)._create_attention_masks = ranged_masks
    blocks = ("SelfAttention", "SelfOutput", "Intermediate", "Output", "Embeddings")
    for module in model.modules():
        kind = type(module).__name__
        if any(kind.endswith(b) for b in blocks):
            ranged(module, f"model.{kind}")


def cast_sources(prof: profile, steps: int) -> str:
    """Dtype casts (``aten::_to_copy``) per step by shape and by the op that asked for them."""
    counts: dict[tuple[str, str], int] = {}
    for event in prof.events():
        if event.name != "aten::_to_copy":
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name in ("aten::to", "aten::_to_copy"):
            parent = parent.cpu_parent
        source = parent.name.replace("autograd::engine::evaluate_function: ", "backward ") if parent else "-"
        key = (str(event.input_shapes[0]) if event.input_shapes else "?", source)
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{shape:22s} {source:52s} {n / steps:6.1f}" for (shape, source), n in
             sorted(counts.items(), key=lambda kv: -kv[1]) if n / steps >= 1]
    return "\ndtype casts (aten::_to_copy) per step, by shape and caller\n" + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sst2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto (default): what `lorafit train` picks here, bf16 where the CPU multiplies it, else fp32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--fast-dropout", action="store_true",
                   help="profile with --fast-dropout (its masks, and its attention in place of SDPA's)")
    p.add_argument("--ranges", action="store_true",
                   help="also time the forward of each LoRA piece and encoder block (forward hooks)")
    p.add_argument("--out", help="folder for the table (<task>-b<batch>-<precision>.txt)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.precision = fastpath.resolve_precision(args.precision, torch.device("cpu"))
    cfg = make_config(task=args.task, batch_size=args.batch_size, precision=args.precision, lora_dropout=0.1,
                      max_train_samples=4096, progress=False, num_threads=args.threads,
                      fast_dropout=args.fast_dropout)
    task = cfg.task_spec()
    data, _ = load_data(cfg, task, load_tokenizer(cfg.model))
    typical, width = typical_batches(cfg, data)
    model, step = training_step(cfg, task, data)
    if args.ranges:
        add_ranges(model)

    for i in range(args.warmup):
        step(typical[i % len(typical)])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.ranges) as prof:
        for i in range(args.steps):
            step(typical[(args.warmup + i) % len(typical)])
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48)
    total = sum(e.self_cpu_time_total for e in events)
    header = {"task": args.task, "batch_size": args.batch_size, "precision": args.precision,
              "threads": args.threads, "fast_dropout": args.fast_dropout, "steps": args.steps,
              "padded_width": width,
              "torch": torch.__version__, "self_cpu_ms_per_step": round(total / 1e3 / args.steps, 2)}
    text = json.dumps(header) + "\n" + table
    if args.ranges:  # forward ranges (hooks) and the loop's own pieces, as shares of the step
        names = sorted((e for e in events if e.key.startswith(("lora.", "model.", "lorafit."))),
                       key=lambda e: -e.cpu_time_total)
        text += "\nrange (forward only for lora.* and model.*)   calls/step   share of step (CPU total)\n"
        text += "".join(f"{e.key:46s} {e.count / args.steps:10.1f}   {100 * e.cpu_time_total / total:6.1f}%\n"
                        for e in names)
        text += cast_sources(prof, args.steps)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"{args.task}-b{args.batch_size}-{args.precision}{'-fast-dropout' if args.fast_dropout else ''}.txt"
        (Path(args.out) / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
