"""Microseconds per CPU dropout mask: PyTorch's ``bernoulli_`` against lorafit's vectorised kernel.

    PYTHONPATH=src python scripts/mask_time.py --threads 2 --out docs/performance/masks

The shapes are those an MRPC step of the embedded model draws at its typical width (16 x 53
tokens: hidden states and LoRA inputs 848 x 384, attention probabilities 16 x 12 x 53 x 53) and an
SST-2 step's (32 x 20 tokens), in fp32 and bf16. The two kernels alternate call by call, each
mask is checked equal to PyTorch's from the same generator state, and the median of ``--calls``
calls is printed with the ratio. ``lorafit bench`` measures what this buys a whole run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lorafit import mt_masks
from lorafit.bench.env import environment

SHAPES = {"mrpc hidden 848 x 384": (848, 384), "mrpc attention 16 x 12 x 53 x 53": (16, 12, 53, 53),
          "sst2 hidden 640 x 384": (640, 384), "sst2 attention 32 x 12 x 20 x 20": (32, 12, 20, 20)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", help="folder for masks.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not mt_masks.available():
        raise SystemExit("mask_time.py: Numba is not installed, so there is no vectorised kernel to time")
    rows = []
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.empty(shape, dtype=dtype)
            times: dict[bool, list[float]] = {False: [], True: []}
            for call in range(args.calls + 10):
                state = torch.get_rng_state()
                masks = []
                for vectorised in (call % 2 == 0, call % 2 == 1):  # alternate which goes first
                    torch.set_rng_state(state)
                    with mt_masks.drawn_vectorised(vectorised):
                        start = time.perf_counter()
                        x.bernoulli_(0.9)
                        elapsed = time.perf_counter() - start
                    masks.append(x.clone())
                    if call >= 10:
                        times[vectorised].append(elapsed * 1e6)
                assert torch.equal(masks[0], masks[1]), name
            row = {"shape": name, "dtype": str(dtype).removeprefix("torch."),
                   "pytorch_us": statistics.median(times[False]), "vectorised_us": statistics.median(times[True])}
            row["speedup"] = row["pytorch_us"] / row["vectorised_us"]
            rows.append(row)
            print(f"{name:34s} {row['dtype']:9s} PyTorch {row['pytorch_us']:7.0f} us   vectorised "
                  f"{row['vectorised_us']:6.0f} us   {row['speedup']:.1f}x")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "calls": args.calls, "rows": rows}
        (Path(args.out) / "masks.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
