"""``lorafit predict``'s batches, longest first against the input's order, in one process.

    LD_PRELOAD=libtcmalloc_minimal.so.4 PYTHONPATH=src python scripts/predict_order.py RUN \
        --task sst2 --batch-size 64 --rounds 5 --out docs/performance/predict

``lorafit predict --input FILE`` runs its examples longest first, as ``lorafit eval`` runs a dev
split, and puts the answers back in the file's order. Batches taken in the file's order are
padded to their longest example. Both orders run here on the same tokenized examples, the same
model and precision as ``lorafit predict RUN`` (``--precision trained``): the examples of
``--input FILE``, or a GLUE task's dev sentences in their file's order (``--task``). The orders alternate
round by round, and the first round of each is a warm-up, not timed. Prints each order's median
seconds, the speed-up, the padded tokens each computes, and how many predicted labels agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lorafit.bench.env import environment
from lorafit.data import collate, eval_order, get_task, load_split
from lorafit.evaluation import predict_logits
from lorafit.inference import load_trained
from lorafit.predict import encode_inputs, read_inputs


def _in_order(n: int, batch_size: int) -> list[np.ndarray]:
    """Batches of consecutive examples, in the input's order (how ``predict`` batched before)."""
    return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _input_order(model: torch.nn.Module, data, batch_size: int, pad: int, autocast) -> np.ndarray:
    """The logits of the batches of :func:`_in_order`."""
    out = []
    for indices in _in_order(len(data), batch_size):
        batch = collate(data, indices, pad)
        batch.pop("labels")
        with torch.inference_mode(), autocast():
            out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="a trained run, adapter or model folder, as `lorafit predict` takes")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="examples, as `lorafit predict --input` reads them")
    source.add_argument("--task", help="or a GLUE task's dev sentences, in the file's order")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each order")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="trained")
    p.add_argument("--out", help="folder for the result (<input stem or task-dev>-b<batch>-<precision>.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    trained = load_trained(args.run, precision=args.precision)
    if args.input:
        pairs, label = read_inputs(args.input), Path(args.input).stem
    else:
        dev = load_split(get_task(args.task), "validation", None)
        pairs, label = list(zip(dev.text_a, dev.text_b or [None] * len(dev))), f"{args.task}-dev"
    data = encode_inputs(trained, pairs)
    pad = trained.tokenizer.pad_token_id or 0
    orders = {
        "longest_first": lambda: predict_logits(trained.model, data, args.batch_size, pad, trained.autocast),
        "input_order": lambda: _input_order(trained.model, data, args.batch_size, pad, trained.autocast),
    }
    logits = {name: run() for name, run in orders.items()}  # the warm-up round
    times: dict[str, list[float]] = {name: [] for name in orders}
    for r in range(args.rounds):
        for name in (list(orders) if r % 2 == 0 else list(orders)[::-1]):
            with torch.inference_mode():
                t0 = time.perf_counter()
                orders[name]()
                times[name].append(time.perf_counter() - t0)
    lengths = data.lengths
    batches = {"longest_first": eval_order(lengths, args.batch_size), "input_order": _in_order(len(data), args.batch_size)}
    result = {
        "input": label, "examples": len(data), "batch_size": args.batch_size,
        "precision": trained.precision, "threads": args.threads, "rounds": args.rounds,
        "real_tokens": int(lengths.sum()),
        "padded_tokens": {name: int(sum(lengths[b].max() * len(b) for b in bs)) for name, bs in batches.items()},
        "seconds": {name: ts for name, ts in times.items()},
        "median_seconds": {name: statistics.median(ts) for name, ts in times.items()},
        "labels_agree": int((logits["longest_first"].argmax(-1) == logits["input_order"].argmax(-1)).sum()),
        "max_abs_logit_difference": float(np.abs(logits["longest_first"] - logits["input_order"]).max()),
        "environment": environment(),
    }
    med = result["median_seconds"]
    for name in orders:
        ts = times[name]
        print(f"{name:<14} {med[name]:.3f} s (min {min(ts):.3f}, max {max(ts):.3f})  "
              f"{result['padded_tokens'][name]:,} padded tokens for {result['real_tokens']:,} real")
    print(f"longest first: {med['input_order'] / med['longest_first']:.2f}x the input order; "
          f"{result['labels_agree']} of {len(data)} labels agree, logits differ by at most "
          f"{result['max_abs_logit_difference']:.2e} ({trained.precision}, batch {args.batch_size}, {args.threads} threads)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{label}-b{args.batch_size}-{trained.precision}.json").write_text(
            json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
