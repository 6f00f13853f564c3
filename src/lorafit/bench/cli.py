"""``lorafit bench``: the flags and the command."""

from __future__ import annotations

import argparse
import sys

from lorafit.bench.spec import Side, Workload
from lorafit.errors import LorafitError

# The Trainer at both precisions as its users get it, and with its own length grouping on: most of
# lorafit's lead over its defaults is that lorafit groups by length (docs/performance.md), so a
# default comparison shows both.
DEFAULT_SIDES = "lorafit,peft@fp32,peft@bf16,peft@bf16+group_by_length"


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _emulated_bf16(device: str) -> str | None:
    """Why bf16 is slow on this CPU, or None. Not asked of a GPU: this process would start CUDA
    (a context on the GPU beside the workers'), and each worker checks its own precision there."""
    if device != "cpu":
        return None
    import torch

    from lorafit.fastpath import emulated_bf16

    return emulated_bf16(torch.device(device))


def default_sides(device: str, notes: list[str]) -> str:
    """DEFAULT_SIDES, its bf16 sides in fp32 on a CPU that only emulates bf16 (saying so in ``notes``).

    There the Trainer's ``bf16=True`` is not its best setting: on an AVX2-only CPU it is 18x slower
    than its fp32 (docs/performance.md, "A CPU without bf16"), and one MRPC run would take hours.
    """
    slow = _emulated_bf16(device)
    if slow is None:
        return DEFAULT_SIDES
    kept = ",".join(dict.fromkeys(s.replace("@bf16", "@fp32") for s in DEFAULT_SIDES.split(",")))
    notes.append(f"lorafit bench: {slow}, so the default sides are {kept}")
    return kept


def _say(line: str, notes: list[str]) -> None:
    while notes:
        print(notes.pop(0), file=sys.stderr, flush=True)
    print(line, flush=True)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    w = Workload()
    p.add_argument("mode", nargs="?", default="train", choices=("train", "infer", "memory"),
                   help="train: examples/s, tokens/s, memory and dev metric of each side; infer: latency of the "
                        "base model, LoRA unmerged and merged; memory: LoRA vs full fine-tuning (default: train)")
    p.add_argument("--sides",
                   help="comma-separated IMPL[@PRECISION][+OPTION|-OPTION]: lorafit (its defaults), peft (HF Trainer + "
                        "PEFT), e.g. lorafit@bf16+compile, lorafit-group_by_length, peft@bf16, peft@bf16+group_by_length "
                        f"(the Trainer's own length grouping) (default: {DEFAULT_SIDES}; in fp32 on a CPU without "
                        "AMX or AVX-512 BF16, which only emulates bf16). infer times each lorafit side, e.g. "
                        "lorafit@bf16,lorafit@fp32 (default: lorafit, in fp32); memory takes one lorafit side")
    p.add_argument("--repeats", type=int, default=3, help="alternations A B A B ... (default: %(default)s)")
    p.add_argument("--output", help="write every measurement and summary as JSON lines to this file "
                                    "(rewritten after each measurement, so a run stopped midway keeps what it measured)")
    p.add_argument("--vary-seed", action="store_true",
                   help="round k trains with seed SEED+k, so dev medians are over seeds (a repeated seed repeats "
                        "lorafit's accuracy exactly)")
    p.add_argument("--from", dest="from_files", action="append", metavar="FILE",
                   help="print the table (and --plot) from earlier --output files instead of measuring (repeatable)")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of training examples/s by side")
    p.add_argument("--no-peak", dest="peak", action="store_false", help="skip the matmul peak measurement")
    p.add_argument("--peak-seconds", type=float, default=0.5,
                   help="seconds spent timing each matmul shape of the peak (default: %(default)s)")
    g = p.add_argument_group("workload (the same for every side)")
    g.add_argument("--task", default=w.task)
    g.add_argument("--model", default=w.model,
                   help="minilm, a model folder, or a shipped architecture (roberta-base, ...) with random weights")
    g.add_argument("--device", default=w.device, choices=("cpu", "cuda"))
    g.add_argument("--batch-size", type=int, default=w.batch_size)
    g.add_argument("--eval-batch-size", type=int, default=w.eval_batch_size)
    g.add_argument("--epochs", type=float, default=w.epochs)
    g.add_argument("--learning-rate", type=float, default=w.learning_rate)
    g.add_argument("--seed", type=int, default=w.seed)
    g.add_argument("--threads", type=int, help="CPU threads for every side (default: physical cores)")
    g.add_argument("--max-length", type=int, default=w.max_length)
    g.add_argument("--max-train-samples", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g.add_argument("--rank", type=int, default=w.rank)
    g.add_argument("--alpha", type=float, default=w.alpha)
    g.add_argument("--lora-dropout", type=float, default=w.lora_dropout)
    g.add_argument("--length-buckets", type=_ints, metavar="A,B",
                   help="lorafit: pad batches up to these lengths (e.g. 128 for fixed shapes)")


def run_bench_cli(args: argparse.Namespace) -> int:
    from lorafit.bench.plot import plot_throughput
    from lorafit.bench.runner import read_jsonl, run_bench, write_jsonl
    from lorafit.bench.summary import format_table
    from lorafit.paths import check_writable_file

    for flag, path in (("--output", None if args.from_files else args.output), ("--plot", args.plot)):
        if path:  # before anything is measured: a path that cannot be written would lose the run
            check_writable_file(flag, path)
    if args.from_files:
        records = read_jsonl(args.from_files)
    else:
        for name in ("batch_size", "eval_batch_size", "repeats", "max_length", "rank"):
            if getattr(args, name) < 1:
                raise LorafitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not args.peak_seconds > 0:
            raise LorafitError(f"--peak-seconds must be > 0, got {args.peak_seconds}")
        if args.threads is not None and args.threads < 1:
            raise LorafitError(f"--threads must be >= 1, got {args.threads}")
        from pathlib import Path

        from lorafit.models import RANDOM_PREFIX, SHIPPED_CONFIGS

        # A shipped architecture name that is not a local folder: random weights (speed needs none).
        model = RANDOM_PREFIX + args.model if args.model in SHIPPED_CONFIGS and not Path(args.model).exists() else args.model
        work = Workload(task=args.task, model=model, batch_size=args.batch_size, epochs=args.epochs,
                        learning_rate=args.learning_rate, seed=args.seed, threads=args.threads,
                        max_length=args.max_length, max_train_samples=args.max_train_samples,
                        max_eval_samples=args.max_eval_samples, eval_batch_size=args.eval_batch_size,
                        rank=args.rank, alpha=args.alpha, lora_dropout=args.lora_dropout, device=args.device,
                        length_buckets=args.length_buckets)
        notes: list[str] = []  # printed once the input is checked, before the first measurement
        default = default_sides(args.device, notes) if args.mode == "train" else "lorafit"
        sides = [Side.parse(s) for s in (args.sides or default).split(",") if s.strip()]
        if not sides:
            raise LorafitError("--sides: give at least one side, e.g. lorafit,peft@bf16")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise LorafitError("--device cuda: no CUDA device is available here")
        in_bf16 = [side.label for side in sides if side.precision == "bf16"]
        if in_bf16 and (slow := _emulated_bf16(args.device)):
            notes.append(f"lorafit: warning: --sides {','.join(in_bf16)}: {slow}")
        save = (lambda so_far: write_jsonl(args.output, so_far)) if args.output else None
        records = run_bench(args.mode, work, sides, args.repeats, measure_peak=args.peak, peak_seconds=args.peak_seconds,
                            say=lambda line: _say(line, notes), vary_seed=args.vary_seed, save=save)
    print(format_table(records))
    if args.output and not args.from_files:
        print(f"records written to {args.output}")
    if args.plot:
        print(f"plot written to {plot_throughput(records, args.plot)}")
    return 0
