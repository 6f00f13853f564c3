"""Medians, spread, ratios and % of peak from bench measurement records; the terminal table.

Summaries are always recomputed from the ``measurement`` records, so a table built from a
JSONL file later (``lorafit bench --from``) is the table the run printed.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from typing import Any

from lorafit.bench.env import cpu_name
from lorafit.bench.spec import Side

TRAIN_FIELDS = ("examples_per_second", "tokens_per_second", "dev_metric", "peak_memory_gib", "train_seconds",
                "compile_seconds")
INFER_FIELDS = ("latency_ms_b1", "latency_p90_ms_b1", "latency_ms_b32", "latency_p90_ms_b32",
                "examples_per_second_b32", "paired_overhead_b1", "paired_overhead_b32")


# Settings a round may change within one workload (``--vary-seed``); all others define the workload.
ROUND_SETTINGS = ("seed",)


def workload_key(settings: dict[str, Any]) -> tuple[str, str, str, str]:
    """Task, model, device and the rest of the workload's settings (canonical JSON): records are
    summarised and compared only within one workload, so that files of runs at different batch
    sizes or lengths read together (``--from A --from B``) are never pooled."""
    rest = {k: v for k, v in settings.items() if k not in ("task", "model", "device", *ROUND_SETTINGS)}
    return settings["task"], settings["model"], settings["device"], json.dumps(rest, sort_keys=True)


def _key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    return workload_key(record["settings"])


def workload_details(settings: list[dict[str, Any]]) -> dict[tuple, str]:
    """For each workload, the settings that tell it apart from the other workloads of the same
    task, model and device (``"batch_size 64, max_length 64"``), or ``""`` when it is the only one."""
    keys = {workload_key(s): s for s in settings}
    details = {}
    for key, s in keys.items():
        peers = [t for k, t in keys.items() if k[:3] == key[:3]]
        differ = sorted({f for t in peers for f in t if f not in ROUND_SETTINGS and t.get(f) != s.get(f)})
        details[key] = ", ".join(f"{f} {_value(s.get(f))}" for f in differ)
    return details


def where_labels(settings: list[dict[str, Any]]) -> dict[tuple, str]:
    """A readable name for each workload: ``task model device``, and its details if it has any."""
    return {k: " ".join(k[:3]) + (f" ({d})" if d else "") for k, d in workload_details(settings).items()}


def _value(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _stats(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / median if median else 0.0, "n": len(values)}


def _peak_for(peaks: list[dict[str, Any]], precision: str) -> float | None:
    """The fastest matmul rate at the model's shapes in ``precision`` over a run's peak records
    (one measured before its first round, one after its last)."""
    dtype = "bf16" if precision == "bf16" else "fp16" if precision == "fp16" else "fp32"
    found = [q["gflops"] for p in peaks for q in p["peaks"] if q["dtype"] == dtype and q["shape"] == "model"]
    return max(found) if found else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary records (``kind: summary`` per side, ``kind: ratio`` per comparison)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    peaks: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "measurement":
            groups[(*_key(r), r["mode"], r["side"], r.get("variant"))].append(r)
        elif r.get("kind") == "peak":
            peaks[_key(r)].append(r)
    out = []
    for (task, model, device, _, mode, side, variant), rows in groups.items():
        fields = TRAIN_FIELDS if mode == "train" else INFER_FIELDS if mode == "infer" else ("peak_memory_gib",)
        summary: dict[str, Any] = {"kind": "summary", "mode": mode, "task": task, "model": model, "device": device,
                                   "side": side, "impl": rows[0]["impl"], "variant": variant,
                                   "precision": rows[0].get("precision"), "settings": rows[0]["settings"],
                                   "environment": rows[0]["environment"]}
        for f in fields:
            values = [r[f] for r in rows if r.get(f) is not None]
            if values:
                summary[f] = _stats(values)
        if mode == "train" and (rounds := _rounds(rows)):
            summary["rounds"] = rounds
        peak = peaks.get(_key(rows[0]))
        # The FLOP count is plain LoRA's: a variant's extra work (DoRA's weight norm) is not in it.
        if mode == "train" and peak and rows[0]["impl"] == "lorafit" and not Side.parse(side).variant:
            flops = _lora_flops_per_second(peak[0]["flops_per_token"], rows[0].get("speed") or {}, summary)
            summary["achieved_gflops"] = flops / 1e9
            top = _peak_for(peak, summary["precision"] or "fp32")
            summary["peak_gflops"] = top
            summary["percent_of_peak"] = 100 * flops / 1e9 / top if top else None
        out.append(summary)
    return out + _ratios(out)


def _rounds(rows: list[dict[str, Any]]) -> list[list[Any]] | None:
    """``[round, examples/s]`` of each round, a round named by its repeat and seed (so that runs of
    other seeds read together keep theirs apart), or None where one occurs twice (two runs of the
    same seeds read together), whose rounds cannot be paired."""
    rounds = [f"{r.get('repeat')}/{r['settings'].get('seed')}" for r in rows]
    if len(set(rounds)) < len(rounds):
        return None
    return [[k, r["examples_per_second"]] for k, r in zip(rounds, rows)]


def _lora_flops_per_second(counts: dict[str, Any], speed: dict[str, Any], summary: dict[str, Any]) -> float:
    """LoRA training FLOP/s: the count per token times tokens/s, less what a last layer cut to its
    first row (``--cls-only-last-layer``) computed once an example instead of once a token."""
    # (Imported here: flops imports torch, which `lorafit train` must not load before it starts
    # again on tcmalloc, and the CLI imports this module.)
    from lorafit.bench.flops import lora_flops

    extent = speed.get("cls_only_last_layer")
    if extent is True:  # the records of 2026-12-07 said only whether; the attention says how far
        extent = "query" if speed.get("attention") == "lorafit_vectorised_masks" else "past_attention"
    return lora_flops(counts["lora"], counts.get("lora_first_row") or {}, extent,
                      summary["tokens_per_second"]["median"], summary["examples_per_second"]["median"])


def _ratios(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        by_key[(*workload_key(s["settings"]), s["mode"])].append(s)
    for (task, model, device, _, mode), rows in by_key.items():
        base = {"kind": "ratio", "mode": mode, "task": task, "model": model, "device": device,
                "settings": rows[0]["settings"]}
        if mode == "train":
            # The comparison that counts is against the Trainer as a user gets it (no switch on), at
            # its best precision; a baseline with a switch on (its own length grouping) is a second
            # comparison, so the table shows what lorafit gains over each.
            baselines: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
            for s in rows:
                if s["impl"] == "peft":
                    baselines[Side.parse(s["side"]).options].append(s)
            for options in sorted(baselines, key=len):
                best = max(baselines[options], key=lambda s: s["examples_per_second"]["median"])
                for s in (s for s in rows if s["impl"] == "lorafit"):
                    out.append(_train_ratio(base, s, best))
            # A LoRA variant's cost: against the lorafit side that differs from it only by the variant.
            for s in (s for s in rows if s["impl"] == "lorafit" and Side.parse(s["side"]).variant):
                side = Side.parse(s["side"])
                plain = dataclasses.replace(side, options=tuple(o for o in side.options if o[0] != side.variant))
                ref = next((r for r in rows if Side.parse(r["side"]) == plain), None)
                if ref:
                    out.append(_train_ratio(base, s, ref))
        elif mode == "infer":
            # Each side (a precision: files of several runs may be read together) has its own base.
            for side in dict.fromkeys(s["side"] for s in rows):
                mine = [s for s in rows if s["side"] == side]
                ref = next((s for s in mine if s["variant"] == "base"), None)
                for s in (s for s in mine if ref and s["variant"] != "base"):
                    ratio = {**base, "side": s["variant"], "against": "base", "infer_side": side, **{
                        f"overhead_b{b}": s[f"latency_ms_b{b}"]["median"] / ref[f"latency_ms_b{b}"]["median"] - 1
                        for b in (1, 32)}}
                    for b in (1, 32):  # the median over repeats of each repeat's median per-input ratio
                        if f"paired_overhead_b{b}" in s:
                            ratio[f"paired_overhead_b{b}"] = s[f"paired_overhead_b{b}"]["median"]
                    out.append(ratio)
        else:
            lora = next((s for s in rows if s["variant"] == "lora"), None)
            full = next((s for s in rows if s["variant"] == "full"), None)
            if lora and full:
                out.append({**base, "side": "lora", "against": "full", "memory_ratio":
                            lora["peak_memory_gib"]["median"] / full["peak_memory_gib"]["median"]})
    return out


def _train_ratio(base: dict[str, Any], side: dict[str, Any], against: dict[str, Any]) -> dict[str, Any]:
    ratio = {**base, "side": side["side"], "against": against["side"],
             "speedup": side["examples_per_second"]["median"] / against["examples_per_second"]["median"],
             "dev_metric_difference": side["dev_metric"]["median"] - against["dev_metric"]["median"]}
    # Round k of both sides ran minutes apart, so their ratio is the least touched by a VM whose
    # speed drifts over a run; the ratio of medians can pair a fast round with a slow one.
    theirs = dict(against.get("rounds") or [])
    paired = [mine / theirs[k] for k, mine in side.get("rounds") or [] if k in theirs]
    if paired:
        ratio["round_speedups"] = paired
        ratio["paired_speedup"] = statistics.median(paired)
    return ratio


def _resolved(summary: dict[str, Any]) -> str:
    """An inference side with the precision it ran in (``lorafit@fp32`` for a plain ``lorafit``)."""
    side, precision = summary["side"], summary.get("precision")
    return side if "@" in side or not precision else f"{side}@{precision}"


def side_label(summary: dict[str, Any]) -> str:
    """The side as written, with the precision a side without ``@PRECISION`` resolved to
    (``lorafit (bf16)``: lorafit's default is ``auto``)."""
    side, precision = summary["side"], summary.get("precision")
    return side if "@" in side or not precision else f"{side} ({precision})"


def _cell(stat: dict[str, float] | None, fmt: str = "{:.1f}") -> str:
    if not stat:
        return "-"
    if stat["n"] == 1:
        return fmt.format(stat["median"])
    return f"{fmt.format(stat['median'])} ±{100 * stat['spread'] / 2:.0f}%"


def format_table(records: list[dict[str, Any]]) -> str:
    """The readable table: ratios first, then each side's medians (± half the min-max spread)."""
    summaries = summarize([r for r in records if r.get("kind") in ("measurement", "peak")])
    lines: list[str] = []
    wheres = where_labels([r["settings"] for r in summaries])
    labels = {(*workload_key(r["settings"]), r["side"]): side_label(r)
              for r in summaries if r["kind"] == "summary" and r["mode"] == "train"}
    infer = [r for r in summaries if r["kind"] == "summary" and r["mode"] == "infer"]
    infer_sides = {r["side"] for r in infer}
    # A plain "lorafit" side infers in fp32 where the train mode's runs in lorafit's default precision,
    # so the latency lines name the precision (records older than the field have none).
    infer_names = {(*workload_key(r["settings"]), r["side"]): _resolved(r) for r in infer}
    precisions = {r.get("precision") for r in infer} - {None}
    one_precision = min(precisions) if len(infer_sides) == 1 and len(precisions) == 1 else None
    for r in (r for r in summaries if r["kind"] == "ratio"):
        key = workload_key(r["settings"])
        where = wheres[key]
        if r["mode"] == "train":
            side, against = (labels.get((*key, s), s) for s in (r["side"], r["against"]))
            rounds = r.get("round_speedups") or []
            paired = (f"; round by round {min(rounds):.2f}-{max(rounds):.2f}x, median {r['paired_speedup']:.2f}x"
                      if len(rounds) > 1 else "")
            lines.append(f"{where}: {side} = {r['speedup']:.2f}x {against} (examples/s, medians{paired}); "
                         f"dev metric {100 * r['dev_metric_difference']:+.2f} pt")
        elif r["mode"] == "infer":
            label = infer_names.get((*key, r["infer_side"])) if len(infer_sides) > 1 else one_precision
            at = f" ({label})" if label else ""
            line = (f"{where}: LoRA {r['side']}{at} latency vs base: {100 * r['overhead_b1']:+.1f}% at batch 1, "
                    f"{100 * r['overhead_b32']:+.1f}% at batch 32")
            if "paired_overhead_b1" in r:
                line += (f" (per input, paired: {100 * r['paired_overhead_b1']:+.1f}%, "
                         f"{100 * r['paired_overhead_b32']:+.1f}%)")
            lines.append(line)
        else:
            lines.append(f"{where}: LoRA peak memory = {r['memory_ratio']:.2f}x full fine-tuning")
    rows = [r for r in summaries if r["kind"] == "summary"]

    def grouped(mode: str) -> list[dict[str, Any]]:
        """The rows of ``mode``, each workload's under its own heading when there are several."""
        mine = [r for r in rows if r["mode"] == mode]
        keys = list(dict.fromkeys(workload_key(r["settings"]) for r in mine))
        if len(keys) == 1:
            return mine
        return [item for k in keys for item in
                [{"heading": wheres[k]}, *(r for r in mine if workload_key(r["settings"]) == k)]]

    if any(r["mode"] == "train" for r in rows):
        width = max(28, *(len(side_label(r)) for r in rows if r["mode"] == "train"))
        lines += ["", (f"{'side':<{width}} {'examples/s':>14} {'tokens/s':>14} {'dev metric':>11} {'peak GiB':>9} "
                       f"{'GFLOP/s':>8} {'% peak':>7} {'compile s':>9}")]
        for r in grouped("train"):
            if "heading" in r:
                lines.append(f"{r['heading']}:")
                continue
            pct = f"{r['percent_of_peak']:.0f}%" if r.get("percent_of_peak") is not None else "-"
            gf = f"{r['achieved_gflops']:.0f}" if r.get("achieved_gflops") else "-"
            lines.append(f"{side_label(r):<{width}} {_cell(r['examples_per_second']):>14} {_cell(r['tokens_per_second'], '{:.0f}'):>14} "
                         f"{_cell(r['dev_metric'], '{:.4f}'):>11} {_cell(r['peak_memory_gib'], '{:.2f}'):>9} "
                         f"{gf:>8} {pct:>7} {_cell(r.get('compile_seconds'), '{:.1f}'):>9}")
    if any(r["mode"] == "infer" for r in rows):
        width = 24 if len(infer_sides) > 1 else 12
        head = f"model, {one_precision}" if one_precision else "model"
        lines += ["", f"{head:<{width}} {'b1 ms':>10} {'b1 p90':>8} {'b32 ms':>10} {'b32 p90':>8} {'b32 ex/s':>9}"]
        for r in grouped("infer"):
            if "heading" in r:
                lines.append(f"{r['heading']}:")
                continue
            name = f"{r['variant']} ({infer_names[(*workload_key(r['settings']), r['side'])]})" if len(infer_sides) > 1 else r["variant"]
            lines.append(f"{name:<{width}} {_cell(r['latency_ms_b1'], '{:.2f}'):>10} "
                         f"{r['latency_p90_ms_b1']['median']:>8.2f} {_cell(r['latency_ms_b32']):>10} "
                         f"{r['latency_p90_ms_b32']['median']:>8.1f} {r['examples_per_second_b32']['median']:>9.0f}")
    if any(r["mode"] == "memory" for r in rows):
        lines += ["", f"{'method':<8} {'peak GiB':>10}"]
        for r in grouped("memory"):
            lines.append(f"{r['heading']}:" if "heading" in r else f"{r['variant']:<8} {_cell(r['peak_memory_gib'], '{:.3f}'):>10}")
    peaks = [r for r in records if r.get("kind") == "peak"]
    several = len({_key(p) for p in peaks}) > 1
    for p in peaks:
        notes = [wheres[_key(p)]] if several and _key(p) in wheres else []
        notes += [f"at the {p['when']}"] if "when" in p else []  # records since 2026-12-07
        at = f" ({', '.join(notes)})" if notes else ""
        lines += ["", f"matmul peak (GFLOP/s){at}: " + ", ".join(f"{q['dtype']} {q['shape']} {q['gflops']:.0f}"
                                                                 for q in p["peaks"])
                  + "".join(f"; {d} not measured: {why}" for d, why in p.get("not_measured", {}).items())]
    env = next((r["environment"] for r in rows), None)
    if env:
        flags = ",".join(k for k, v in env["cpu_flags"].items() if v) or "none"
        lines += ["", f"{cpu_name(env)} (flags: {flags}), {env['threads']} threads, device {env['device']}"
                      + (f" {env['gpu']}" if env.get("gpu") else "")
                      + ", " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)]
    return "\n".join(lines).strip("\n")
