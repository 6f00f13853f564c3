"""How the frozen layers' bf16 products scale from 1 to 2 threads, as a training step calls them.

    LD_PRELOAD=libtcmalloc_minimal.so.4 PYTHONPATH=src python scripts/matmul_threads.py \
        --out docs/performance/threads/matmul-threads.json

For each of the embedded model's layer shapes (in -> out: 384 -> 384, 384 -> 1536, 1536 -> 384)
and each row count (tokens in a batch; 848 is a typical MRPC batch, 16 x 53), times the two
products a frozen linear layer costs a step, at each thread count:

* ``forward``: ``F.linear(x, W, b)``, the weight ``[out, in]`` as the layer stores it;
* ``input_grad``: ``g @ W``, the product autograd computes for the layer's input gradient;

and, beside each, the same rows split in two halves and computed as one batched product
(``baddbmm`` / ``bmm`` over a batch of 2), which oneDNN spreads over the threads differently.
Prints the median microseconds, GFLOP/s, the 2-thread speed-up, and whether the split gives the
same bits. ``lorafit bench`` measures whole runs; this shows where a step's matmuls lose the
second core (docs/performance/journal.md, "Two threads").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit.bench.env import environment


def median_seconds(call: Callable[[], torch.Tensor], budget: float = 0.05) -> float:
    """Median of 5 samples of one call, each sample long enough (``budget`` s) to time well."""
    for _ in range(3):
        call()
    start = time.perf_counter()
    call()
    repeats = max(5, int(budget / max(time.perf_counter() - start, 1e-7)))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        samples.append((time.perf_counter() - start) / repeats)
    return statistics.median(samples)


def products(rows: int, n_in: int, n_out: int) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """Each product as (one call, the same rows split into a batch of two halves)."""
    x = torch.randn(rows, n_in).bfloat16()
    w = torch.randn(n_out, n_in).bfloat16()
    b = torch.randn(n_out).bfloat16()
    g = torch.randn(rows, n_out).bfloat16()
    w_t = w.t().contiguous()
    half = rows // 2
    return {
        "forward": (lambda: F.linear(x, w, b),
                    lambda: torch.baddbmm(b, x.view(2, half, n_in), w_t.expand(2, n_in, n_out)).view(rows, n_out)),
        "input_grad": (lambda: g @ w, lambda: torch.bmm(g.view(2, half, n_out), w.expand(2, n_out, n_in)).view(rows, n_in)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="424,848,1280,1920", help="tokens in a batch (even: the split halves them)")
    p.add_argument("--shapes", default="384x384,384x1536,1536x384", help="in x out of the frozen layers")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if any(r % 2 for r in rows_list):
        p.error("--rows: expected even row counts (the split computes two halves)")
    threads = [int(t) for t in args.threads.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    torch.manual_seed(0)
    results = []
    for n_in, n_out in shapes:
        for rows in rows_list:
            for name, (whole, split) in products(rows, n_in, n_out).items():
                flops = 2 * rows * n_in * n_out
                row = {"product": name, "rows": rows, "in": n_in, "out": n_out, "us": {}, "us_split": {}}
                for t in threads:
                    torch.set_num_threads(t)
                    row["us"][t] = round(median_seconds(whole) * 1e6, 1)
                    row["us_split"][t] = round(median_seconds(split) * 1e6, 1)
                # At the last thread count, where the split's speed is compared: bits can depend on it.
                row["same_bits_split"] = bool(torch.equal(whole(), split()))
                first, last = threads[0], threads[-1]
                print(f"{name:10s} {rows:5d} x {n_in:4d} -> {n_out:4d}: "
                      + "  ".join(f"{t} thr {row['us'][t]:7.1f} us ({flops / row['us'][t] / 1e3:5.0f} GFLOP/s)" for t in threads)
                      + f"  x{row['us'][first] / row['us'][last]:.2f} from {last} threads;"
                      f" split at {last}: {row['us_split'][last]:7.1f} us (x{row['us'][last] / row['us_split'][last]:.2f},"
                      f" {'same bits' if row['same_bits_split'] else 'other bits'})", flush=True)
                results.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
