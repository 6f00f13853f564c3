"""One measurement, in a fresh process: ``python -m lorafit.bench.worker SPEC.json OUT.json``.

Each side of a comparison runs in its own interpreter, so memory peaks, thread pools,
allocator caches and compiled graphs of one never help or hurt the other.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit import fastpath
from lorafit.bench.env import environment, physical_cores
from lorafit.bench.spec import Side, Workload, lorafit_config


def lorafit_train(work: Workload, side: Side) -> dict[str, Any]:
    from lorafit.train import train

    with tempfile.TemporaryDirectory() as out:
        summary = train(lorafit_config(work, side, str(Path(out) / "run")))
    return {
        "examples": summary["examples"],
        "tokens": summary["tokens"],
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "trainable_parameters": summary["trainable_parameters"],
        "examples_per_second": summary["examples_per_second"],
        "tokens_per_second": summary["tokens_per_second"],
        "peak_memory_gib": summary["peak_memory_gib"],
        "metric": summary["metric"],
        "dev_metric": summary["best_metric"],
        "precision": summary["precision"],
        "compile_seconds": summary.get("compile_seconds", 0.0),
        # What the side's label meant that day: defaults change, the record should not need them.
        "speed": summary["speed"],
    }


def _inference_data(work: Workload) -> tuple[Any, int]:
    """The dev set every inference variant runs on, and the tokenizer's padding id."""
    from lorafit.models import load_tokenizer
    from lorafit.train import load_data

    cfg = lorafit_config(work, Side("lorafit"), tempfile.mkdtemp())
    tokenizer = load_tokenizer(cfg.model)
    _, evals = load_data(cfg, cfg.task_spec(), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return next(iter(evals.values())), pad


def _inference_model(work: Workload, variant: str) -> torch.nn.Module:
    """The model for one inference variant: base, LoRA unmerged, or LoRA merged and unloaded."""
    from lorafit.lora import merge_and_unload
    from lorafit.train import build_model

    cfg = lorafit_config(work, Side("lorafit"), tempfile.mkdtemp(), method="full" if variant == "base" else "lora")
    model = build_model(cfg, cfg.task_spec())
    if variant != "base":
        gen = torch.Generator().manual_seed(work.seed)
        with torch.no_grad():  # a trained-looking adapter: B != 0, so merging changes the weights
            for name, p in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        if variant == "merged":
            model = merge_and_unload(model)
    return model.eval().to(work.device)


def infer(work: Workload, side: Side, variants: Sequence[str], calls: int = 60) -> dict[str, Any]:
    """Latency (median, p90) at batch 1 and 32, and throughput at 32, of each model variant.

    The variants' calls are interleaved (each input runs through every model in turn, the order
    rotating from one input to the next) rather than timed one model after the other: on a shared
    VM the machine's speed drifts by tens of percent within a minute, which timed blocks would
    read as differences between the models. Interleaved, each input also gives a paired ratio
    (a variant's time over the base model's on the same input), whose median is reported too.

    An untimed pass over the same inputs comes first. Some costs come once per input shape: on
    a CPU, oneDNN generates kernels for each new sequence length, and unmerged LoRA has two more
    products per layer to generate them for. A few warm-up inputs would leave most lengths to
    the timed pass, and with 5 that put unmerged LoRA several points higher at batch 1 in bf16
    (docs/performance/journal.md, "Unmerged inference on the AMD EPYC").
    """
    from lorafit.data import collate
    from lorafit.lora import pack_lora

    data, pad = _inference_data(work)
    models = {v: _inference_model(work, v) for v in variants}
    device = torch.device(work.device)
    # A plain "lorafit" side infers in fp32 (`lorafit eval --precision fp32`); "@bf16" as a bf16 run's
    # `lorafit eval` / `predict` now do by default; "@auto" as `--precision auto`.
    precision = fastpath.resolve_precision(side.precision or "fp32", device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # As `lorafit eval` / `predict` (CPU) hold a bf16 model; on a GPU too, where autocast would
    # otherwise cast every weight again at every call (a kernel launch per linear layer).
    if precision == "bf16":
        from lorafit.inference import cast_linears_bf16

        for model in models.values():
            cast_linears_bf16(model)
    out: dict[str, dict[str, Any]] = {v: {"variant": v, "precision": precision, "warmup_inputs": calls} for v in variants}
    if "unmerged" in models:  # as `lorafit eval --unmerged` holds it: packed where the dtype allows
        out["unmerged"]["packed_groups"] = pack_lora(models["unmerged"])
    for batch in (1, 32):
        times: dict[str, list[float]] = {v: [] for v in variants}
        for n in range(2 * calls):  # a warm-up pass, then the timed one over the same inputs
            first = (n % calls) * batch  # consecutive dev examples, wrapping around a small set
            inputs = collate(data, np.arange(first, first + batch) % len(data), pad)
            inputs.pop("labels")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            for k in range(len(variants)):
                variant = variants[(n + k) % len(variants)]
                t0 = time.perf_counter()
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    models[variant](**inputs).logits.float().cpu()  # .cpu() waits for the GPU
                if n >= calls:
                    times[variant].append(time.perf_counter() - t0)
        for variant, ts in times.items():
            out[variant][f"latency_ms_b{batch}"] = statistics.median(ts) * 1e3
            out[variant][f"latency_p90_ms_b{batch}"] = float(np.percentile(ts, 90)) * 1e3
            out[variant][f"examples_per_second_b{batch}"] = batch * len(ts) / sum(ts)
            if "base" in times and variant != "base":
                out[variant][f"paired_overhead_b{batch}"] = statistics.median(
                    t / b for t, b in zip(ts, times["base"])) - 1
    return {"variants": [out[v] for v in variants]}


def memory(work: Workload, side: Side, method: str, steps: int = 20) -> dict[str, Any]:
    """Peak memory of a short training run (LoRA or full fine-tuning) at the workload's batch."""
    from lorafit.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = lorafit_config(work, side, str(Path(out) / "run"), method=method, max_steps=steps,
                             learning_rate=work.learning_rate if method == "lora" else 5e-5)
        summary = train(cfg)
    return {"method": method, "peak_memory_gib": summary["peak_memory_gib"], "steps": summary["steps"],
            "trainable_parameters": summary["trainable_parameters"]["trainable"],
            "examples_per_second": summary["examples_per_second"], "precision": summary["precision"]}


def peak(work: Workload, side: Side, budget: float = 0.5) -> dict[str, Any]:
    """The FLOP count per token of this model and the matmul peak at its own layer shapes."""
    from lorafit.bench.env import cpu_has_bf16_matmul
    from lorafit.bench.flops import (
        first_row_flops_per_token,
        layer_shapes,
        linear_flops_per_token,
        matmul_peak,
    )
    from lorafit.models import load_tokenizer
    from lorafit.train import build_model, load_data

    cfg = lorafit_config(work, side, tempfile.mkdtemp())
    task = cfg.task_spec()
    train_data, _ = load_data(cfg, task, load_tokenizer(cfg.model))
    model = build_model(cfg, task)
    full = build_model(cfg.replace(method="full"), task)
    # Rows of the activation matrix in a typical batch: batch size x mean tokens per example.
    tokens = int(work.batch_size * float(train_data.lengths.mean()))
    dtypes = ("fp32", "bf16") if work.device == "cpu" else ("fp32", "bf16", "fp16")
    # A CPU without AMX or AVX-512 BF16 only emulates bf16: one 2048-square product takes seconds
    # (1-2 GFLOP/s against 170 in fp32), and its "peak" would measure the emulation. Not measured there; % of peak is "-".
    emulated = work.device == "cpu" and not cpu_has_bf16_matmul()
    peaks = matmul_peak(work.device, tuple(d for d in dtypes if not (emulated and d == "bf16")), tokens=tokens,
                        shapes=layer_shapes(model), square=2048 if work.device == "cpu" else 8192, budget=budget)
    return {"flops_per_token": {"lora": linear_flops_per_token(model, "lora"),
                                "full": linear_flops_per_token(full, "full"),
                                "lora_first_row": first_row_flops_per_token(model, "lora")},
            "batch_tokens": tokens, "peaks": [p.as_dict() for p in peaks],
            "not_measured": {"bf16": "emulated on this CPU (no AMX or AVX-512 BF16)"} if emulated else {}}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    work = Workload(**spec["work"])
    side = Side(spec["side"]["impl"], spec["side"]["precision"], tuple(map(tuple, spec["side"]["options"])))
    torch.set_num_threads(work.threads or physical_cores())
    if spec["mode"] == "train":
        if side.impl == "peft":
            from lorafit.bench.baseline import peft_train

            result = peft_train(work, side)
        else:
            result = lorafit_train(work, side)
    elif spec["mode"] == "infer":
        result = infer(work, side, spec["variants"])
    elif spec["mode"] == "peak":
        result = peak(work, side, spec.get("budget", 0.5))
    else:
        result = memory(work, side, spec["variant"])
    return {**result, "environment": environment(work.device)}


def main(argv: list[str]) -> int:
    from lorafit.errors import LorafitError

    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        result = run(spec)
    except LorafitError as e:  # bad input: one line for the parent to show
        result = {"error": str(e)}
    Path(argv[1]).write_text(json.dumps(result, default=_jsonable), encoding="utf-8")
    return 0


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
