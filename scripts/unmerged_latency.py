"""Unmerged LoRA's latency over the base model's, implementations side by side in one process.

    LD_PRELOAD=libtcmalloc_minimal.so.4 PYTHONPATH=src python scripts/unmerged_latency.py \
        --calls 300 --compare-layer ../old-checkout/src/lorafit/lora/layer.py

Builds the models ``lorafit bench infer`` builds (embedded MiniLM, SST-2 dev sentences, a LoRA
adapter with B != 0, every linear layer held in bf16 as ``lorafit eval`` holds a bf16 run), then
runs each input through all of them in turn, at batch 1 (``--batch-size``) under bf16 autocast. Prints each
variant's median latency and its paired overhead: the median over inputs of its time over the
base model's on the same input.

``lorafit bench infer`` starts a fresh process per repeat; between processes the same model's
overhead moves by 1-2 points at batch 1, more than some changes to ``LoRALinear`` are worth.
Here every variant shares one process, so such a change can be seen. Variants: ``base``;
``unmerged`` (``LoRALinear`` as it is); ``unmerged-again`` (a second copy of it: the difference
between the two is what the harness cannot resolve); with ``--compare-layer FILE``, ``unmerged-compared``,
whose LoRA layers run the methods of the ``LoRALinear`` in FILE (another checkout's
``lorafit/lora/layer.py``; repeat the flag for more); with ``--floor``, ``unmerged-floor``, the
four operators of an exact layer and nothing else, the least any exact layer can cost; with
``--packed``, ``unmerged-packed``, the layers packed per attention block (``lorafit.lora.packed``).
Each input runs through the variants in a random order.
The unmerged variants' logits must agree to the bit; the script stops if they do not.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from lorafit.bench import worker
from lorafit.bench.env import environment
from lorafit.bench.spec import Workload
from lorafit.data import collate
from lorafit.inference import cast_linears_bf16
from lorafit.lora import LoRALinear, pack_lora


def _with_layer_from(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A copy whose LoRA layers run the methods of the ``LoRALinear`` defined in ``path``."""
    spec = importlib.util.spec_from_file_location("compared_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    other = module.LoRALinear
    state = vars(other(torch.nn.Linear(2, 2), r=1, alpha=1.0))  # the compared class's per-layer state
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            for name, value in state.items():
                if name not in vars(layer) and not hasattr(type(layer), name):  # (a property here: keep its value)
                    setattr(layer, name, copy.copy(value))
            for name, value in vars(other).items():
                if callable(value) and not name.startswith("__"):
                    setattr(layer, name, types.MethodType(value, layer))
    return model


def _floor(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose LoRA layers run the frozen product, the two rank-8 products and the add (the
    scale as its alpha), and nothing else: no check, no lookup, no second module call. No exact
    layer can do less, so its overhead is the floor of any change to ``LoRALinear``'s evaluation path."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            if not layer._scaling_is_exact:
                raise SystemExit("--floor needs a scale that is a power of two, 1 or more")

            def forward(x, w=layer.base_layer.weight, bias=layer.base_layer.bias, a=layer.lora_A.weight,
                        b=layer.lora_B.weight, scale=layer.scaling):
                x = x.to(a.dtype)
                return F.linear(x, w, bias).add_(F.linear(F.linear(x, a), b), alpha=scale)

            layer.forward = forward
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300, help="timed inputs (each through every variant)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1, help="examples an input (consecutive dev examples)")
    p.add_argument("--compare-layer", action="append", default=[],
                   help="another checkout's lorafit/lora/layer.py (repeatable: unmerged-compared, -compared-2, ...)")
    p.add_argument("--floor", action="store_true",
                   help="add unmerged-floor: the layer's four operators and nothing else (see _floor)")
    p.add_argument("--packed", action="store_true",
                   help="add unmerged-packed: the layers packed per attention block, as `lorafit eval --unmerged` runs")
    p.add_argument("--order", choices=("random", "rotate"), default="random",
                   help="each input's order of the variants: random, or rotating by one (each follows the same other)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    work = Workload(task="sst2", threads=args.threads)
    data, pad = worker._inference_data(work)
    built = {"base": worker._inference_model(work, "base"), "unmerged": worker._inference_model(work, "unmerged")}
    for model in built.values():
        cast_linears_bf16(model)
    # Every variant a copy made the same way, so that none differs from another in how its
    # memory came to be laid out (a copy and the model it was made from measured alike here).
    models = {"base": copy.deepcopy(built["base"]), "unmerged": copy.deepcopy(built["unmerged"]),
              "unmerged-again": copy.deepcopy(built["unmerged"])}
    for k, path in enumerate(args.compare_layer, start=1):
        models["unmerged-compared" + (f"-{k}" if k > 1 else "")] = _with_layer_from(built["unmerged"], path)
    if args.floor:
        models["unmerged-floor"] = _floor(built["unmerged"])
    if args.packed:
        models["unmerged-packed"] = copy.deepcopy(built["unmerged"])
        pack_lora(models["unmerged-packed"])
    del built

    variants = list(models)
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = np.random.default_rng(0)
    for n in range(args.warmup + args.calls):
        inputs = collate(data, np.arange(n * args.batch_size, (n + 1) * args.batch_size) % len(data), pad)
        inputs.pop("labels")
        logits = {}
        # A fresh order for each input (by default): in a fixed rotation each model always follows
        # the same other one and finds the caches as that one left them. (Both orders measured
        # alike here; the bench rotates.)
        turn = n % len(variants)
        for variant in order.permutation(variants) if args.order == "random" else variants[turn:] + variants[:turn]:
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits[variant] = models[variant](**inputs).logits.float()
            if n >= args.warmup:
                times[variant].append(time.perf_counter() - start)
        unmerged = [v for v in variants if v != "base"]
        if not all(torch.equal(logits[v], logits["unmerged"]) for v in unmerged):
            raise SystemExit(f"input {n}: the unmerged variants' logits differ")

    env = environment()
    flags = ", ".join(k for k, on in env["cpu_flags"].items() if on)
    print(f"{env['cpu']} ({flags}), {env['threads']} threads, {env['allocator']}, "
          f"torch {env['versions']['torch']}, batch {args.batch_size}, bf16, {args.calls} inputs")
    for variant in variants:
        paired = statistics.median(t / b for t, b in zip(times[variant], times["base"])) - 1
        print(f"{variant:20s} median {statistics.median(times[variant]) * 1e3:6.2f} ms   paired overhead {paired:+.1%}")


if __name__ == "__main__":
    main()
