"""Run a benchmark: sides alternate (A B A B ...), each measurement in a fresh process.

Alternating spreads slow drifts of a shared machine (other jobs, thermal limits) over every
side instead of loading them onto whichever ran last. The matmul peak is measured in the same
invocation, before the first round and after the last, and "% of peak" divides by the faster of
the two: a peak taken while the machine was slow would flatter every side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.bench.env import physical_cores
from lorafit.bench.spec import Side, Workload, lorafit_config
from lorafit.errors import LorafitError

MODES = ("train", "infer", "memory")
INFER_VARIANTS = ("base", "unmerged", "merged")
MEMORY_VARIANTS = ("lora", "full")


def worker_env(threads: int, side: Side, device: str) -> dict[str, str]:
    """A worker's environment: its thread count and its side's allocator, set before Python starts.

    The thread pools are sized before torch starts, so both sides get the same count. An
    allocator preloaded in the bench's own environment is not passed on: each side gets the one
    it names (see :class:`lorafit.bench.spec.Side`).
    """
    from lorafit import allocator

    chosen = allocator.resolve(side.allocator, "cuda" if device.startswith("cuda") else "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "LD_PRELOAD": allocator.preload(chosen, os.environ.get("LD_PRELOAD", ""))}
    if not env["LD_PRELOAD"]:
        del env["LD_PRELOAD"]
    return env


def run_worker(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        env = worker_env(threads, Side(**spec["side"]), spec["work"]["device"])
        proc = subprocess.run([sys.executable, "-m", "lorafit.bench.worker", str(spec_file), str(out_file)],
                              check=False, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"bench worker failed ({spec['mode']} {spec['side']}):\n{tail}")
        result = json.loads(out_file.read_text(encoding="utf-8"))
    if "error" in result:
        raise LorafitError(result["error"])
    return result


def _spec(mode: str, work: Workload, side: Side, variant: str | None = None) -> dict[str, Any]:
    return {"mode": mode, "work": work.as_dict(), "side": dataclasses.asdict(side), "variant": variant}


def schedule(mode: str, sides: list[Side]) -> list[tuple[Side, str | None]]:
    """What one repeat measures, in order: one worker per entry. Inference times its variants in
    one worker, interleaved (see :func:`lorafit.bench.worker.infer`)."""
    if mode == "train":
        return [(s, None) for s in sides]
    mine = list(dict.fromkeys(s for s in sides if s.impl == "lorafit")) or [Side("lorafit")]
    if mode == "infer":  # each precision against its own base model, alternated like the train mode's sides
        return [(s, None) for s in mine]
    return [(mine[0], v) for v in MEMORY_VARIANTS]


def run_bench(
    mode: str,
    work: Workload,
    sides: list[Side],
    repeats: int = 3,
    measure_peak: bool = True,
    peak_seconds: float = 0.5,
    say: Callable[[str], None] = print,
    vary_seed: bool = False,
    save: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """All measurement records of one benchmark, then its summary records (see :mod:`.summary`).

    Args:
        mode: ``train``, ``infer`` or ``memory``.
        work: The workload every side runs.
        sides: Implementations and settings. Infer times each lorafit side (a precision, say);
            memory takes one lorafit side. Neither times the Trainer, so a peft side is refused there.
        repeats: Alternations: each side runs once per repeat, in the order given.
        measure_peak: Measure the matmul peak and the FLOP count before the first round and the
            peak again after the last (train mode).
        peak_seconds: Rough seconds spent timing each matmul shape.
        say: Progress lines go here.
        vary_seed: Round ``k`` trains with ``work.seed + k``, so the dev medians are over seeds
            (lorafit's runs are deterministic: repeating a seed only repeats its accuracy).
        save: Called with the records so far (and their summary) after each measurement, so a
            run that stops midway keeps what it measured.
    """
    from lorafit.bench.summary import summarize

    if mode not in MODES:
        raise LorafitError(f"bench mode must be one of {', '.join(MODES)}, got {mode!r}")
    if repeats < 1:
        raise LorafitError(f"--repeats must be >= 1, got {repeats}")
    if any(s.impl == "peft" for s in sides) and mode == "train":
        from lorafit.bench.baseline import require_peft

        require_peft()  # fail before any measurement, not after the first lorafit run
    if mode != "train":
        check_sides_for(mode, sides)
    check_sides(work, sides)
    threads = work.threads or physical_cores()
    work = dataclasses.replace(work, threads=threads)
    settings = work.as_dict()
    records: list[dict[str, Any]] = []
    peak_spec = None
    if mode == "train" and measure_peak:
        peak_spec = {**_spec("peak", work, next((s for s in sides if s.impl == "lorafit"), Side("lorafit"))),
                     "budget": peak_seconds}
        say("measuring the matmul peak and the FLOP count ...")
        records += _peak_record(peak_spec, threads, "start", settings, say)
    plan = schedule(mode, sides)
    for repeat in range(repeats):
        round_work = dataclasses.replace(work, seed=work.seed + repeat) if vary_seed else work
        for side, variant in plan:
            started = time.perf_counter()
            spec = _spec(mode, round_work, side, variant)
            if mode == "infer":
                spec["variants"] = list(INFER_VARIANTS)
            result = run_worker(spec, threads)
            environment = result.pop("environment")
            for one in result.pop("variants", [result]):  # infer: one record per variant
                record = {"kind": "measurement", "mode": mode, "side": side.label, "impl": side.impl,
                          "variant": variant, "repeat": repeat, "settings": round_work.as_dict(), **one,
                          "environment": environment}
                records.append(record)
                name = side.label + (f" {record['variant']}" if record["variant"] else "")
                say(f"[{repeat + 1}/{repeats}] {name}: {_brief(mode, one)} "
                    f"({time.perf_counter() - started:.0f} s wall)")
            if save is not None:
                save(records + summarize(records))
    if peak_spec is not None:
        # A VM's speed drifts by tens of percent within a run: a peak taken at a slow moment makes
        # every side look closer to the hardware than it is. "% of peak" uses the faster of the two.
        say("measuring the matmul peak again ...")
        records += _peak_record(peak_spec, threads, "end", settings, say)
        if save is not None:
            save(records + summarize(records))
    return records + summarize(records)


def _peak_record(spec: dict[str, Any], threads: int, when: str, settings: dict[str, Any],
                 say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The peak worker's record (``when``: ``start`` or ``end`` of the run), or none if it failed."""
    try:
        peak = run_worker(spec, threads)
    except RuntimeError as err:  # the sides' speeds are still worth measuring; "% of peak" shows "-"
        say(f"the matmul peak ({when}) was not measured: {str(err).splitlines()[-1]}")
        return []
    return [{"kind": "peak", "mode": "train", "when": when, "settings": settings, **peak}]


def check_sides_for(mode: str, sides: list[Side]) -> None:
    """Refuse sides that ``infer`` or ``memory`` would not measure, rather than drop them silently."""
    trainer = [s.label for s in sides if s.impl != "lorafit"]
    if trainer:
        raise LorafitError(f"--sides {','.join(trainer)}: bench {mode} measures lorafit's models only "
                           f"(the Trainer is compared in bench train); give lorafit sides, e.g. lorafit@bf16,lorafit@fp32")
    if mode == "memory" and len(set(sides)) > 1:
        raise LorafitError(f"--sides {','.join(s.label for s in sides)}: bench memory compares LoRA with full "
                           "fine-tuning for one side; give one lorafit side")


def check_sides(work: Workload, sides: list[Side]) -> None:
    """Refuse a bad workload or lorafit side before anything is measured.

    The workers would refuse the same input, but only after the matmul peak (seconds) or earlier
    sides' runs (minutes); these are the checks a worker makes before it reads any data.
    """
    for side in [s for s in sides if s.impl == "lorafit"] or [Side("lorafit")]:
        cfg = lorafit_config(work, side, output_dir="bench")  # each field's own checks
        cfg.task_spec()  # the task exists (the baseline trains the same one)
        if cfg.compile and cfg.compile_mode == "step-graph":
            from lorafit import fastpath, step_graph

            device = fastpath.resolve_device(cfg.device)
            step_graph.check_supported(device, fastpath.resolve_precision(cfg.precision, device), cfg.grad_accum, 1)


def _brief(mode: str, result: dict[str, Any]) -> str:
    if mode == "train":
        return (f"{result['examples_per_second']:.1f} examples/s, dev {result['metric']} "
                f"{result['dev_metric']:.4f}")
    if mode == "infer":
        return f"b1 {result['latency_ms_b1']:.2f} ms, b32 {result['latency_ms_b32']:.1f} ms"
    return f"peak {result['peak_memory_gib']:.3f} GiB"


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    from lorafit.io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def read_jsonl(paths: list[str | Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise LorafitError(f"{path}: bench results not found") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise LorafitError(f"{path}:{n}: not a JSON line (expected `lorafit bench --output` records)") from None
    return records
