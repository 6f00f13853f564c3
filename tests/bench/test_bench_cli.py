"""`lorafit bench` end to end on a CI-sized workload: both sides run, every field is there.

No timing is asserted: these runs are far too short to mean anything, and the machine is shared.
"""

from __future__ import annotations

import json

import pytest

from lorafit import allocator
from lorafit.bench.env import cpu_has_bf16_matmul
from lorafit.cli import main

TINY = ["--task", "rte", "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8",
        "--max-length", "32", "--repeats", "1", "--threads", "1", "--peak-seconds", "0.01"]
TRAIN_FIELDS = {"examples_per_second", "tokens_per_second", "peak_memory_gib", "dev_metric", "metric", "train_seconds",
                "examples", "tokens", "steps", "precision", "compile_seconds"}
LORAFIT_FIELDS = TRAIN_FIELDS | {"speed"}


def test_a_variant_side_trains_that_variant_and_is_compared_with_plain_lora(tmp_path):
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "train", *TINY, "--no-peak", "--sides",
                 "lorafit@fp32,lorafit@fp32+dora,lorafit@fp32+fast_dropout+reuse_memory-tcmalloc", "--output", str(out)]) == 0
    records = _records(out)
    plain, dora, fast = (next(r for r in records if r["kind"] == "measurement" and r["side"] == s)
                         for s in ("lorafit@fp32", "lorafit@fp32+dora", "lorafit@fp32+fast_dropout+reuse_memory-tcmalloc"))
    # Each measurement records the speed settings its label stood for, defaults included
    # (reused memory is glibc's: the third side leaves tcmalloc, where installed, to have it).
    assert (plain["speed"]["fast_dropout"], plain["speed"]["reuse_memory"]) == (False, False)
    assert (fast["speed"]["fast_dropout"], fast["speed"]["reuse_memory"]) == (True, True)
    # DoRA trains one magnitude per output row of each adapted layer on top of A and B: MiniLM's
    # query and value in 6 layers, 384 rows each.
    assert dora["trainable_parameters"]["adapter"] - plain["trainable_parameters"]["adapter"] == 6 * 2 * 384
    (ratio,) = [r for r in records if r["kind"] == "ratio" and r["side"] == "lorafit@fp32+dora"]
    assert ratio["against"] == "lorafit@fp32"
    assert ratio["speedup"] == pytest.approx(dora["examples_per_second"] / plain["examples_per_second"])


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_bench_runs_both_sides_and_computes_the_ratio(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "train", *TINY, "--sides", "lorafit@fp32,peft@fp32", "--output", str(out),
                 "--plot", str(tmp_path / "plot.png")]) == 0
    records = _records(out)
    # The peak is measured before the first round and after the last.
    at = {kind: [i for i, r in enumerate(records) if r["kind"] == kind] for kind in ("peak", "measurement")}
    assert at["peak"][0] < min(at["measurement"]) and at["peak"][1] > max(at["measurement"])
    peaks = [r for r in records if r["kind"] == "peak"]
    assert [p["when"] for p in peaks] == ["start", "end"]
    # bf16 only where the CPU multiplies it: emulated, one 2048-square product takes seconds.
    native = cpu_has_bf16_matmul()
    for peak in peaks:
        assert {p["dtype"] for p in peak["peaks"]} == ({"fp32", "bf16"} if native else {"fp32"})
        assert "model" in {p["shape"] for p in peak["peaks"]}
        assert peak["not_measured"] == ({} if native else {"bf16": "emulated on this CPU (no AMX or AVX-512 BF16)"})
        assert peak["flops_per_token"]["lora"] > 0
    runs = [r for r in records if r["kind"] == "measurement"]
    assert [r["side"] for r in runs] == ["lorafit@fp32", "peft@fp32"]
    for r in runs:
        fields = LORAFIT_FIELDS if r["impl"] == "lorafit" else TRAIN_FIELDS
        assert fields <= set(r), fields - set(r)
        assert r["examples"] == 16 and r["steps"] == 2 and r["examples_per_second"] > 0
        assert r["settings"]["batch_size"] == 8 and r["settings"]["threads"] == 1
        env = r["environment"]
        assert env["threads"] == 1 and "amx_bf16" in env["cpu_flags"] and env["versions"]["peft"]
    # lorafit's worker runs on its default allocator (tcmalloc where installed), the baseline's
    # on the system's, as each runs for a user; the record says which.
    lora, base = runs
    assert lora["environment"]["allocator"] == lora["speed"]["allocator"] == allocator.resolve("auto", "cpu")
    assert base["environment"]["allocator"] == "system"
    (ratio,) = [r for r in records if r["kind"] == "ratio"]
    assert ratio["speedup"] == pytest.approx(runs[0]["examples_per_second"] / runs[1]["examples_per_second"])
    assert ratio["dev_metric_difference"] == pytest.approx(runs[0]["dev_metric"] - runs[1]["dev_metric"])
    mine = next(r for r in records if r["kind"] == "summary" and r["side"] == "lorafit@fp32")
    assert mine["percent_of_peak"] > 0
    fastest = max(q["gflops"] for p in peaks for q in p["peaks"] if q["dtype"] == "fp32" and q["shape"] == "model")
    assert mine["peak_gflops"] == fastest
    printed = capsys.readouterr().out
    assert "lorafit@fp32 = " in printed and "matmul peak (GFLOP/s) (at the start)" in printed
    assert "matmul peak (GFLOP/s) (at the end)" in printed
    assert ("bf16 not measured: emulated on this CPU" in printed) != native and (tmp_path / "plot.png").stat().st_size > 0
    # The table can be rebuilt from the file alone.
    assert main(["bench", "--from", str(out)]) == 0
    table = printed.split("measuring the matmul peak again ...\n")[1]  # after the progress lines
    assert capsys.readouterr().out.splitlines()[0] == table.splitlines()[0]


def test_bad_bench_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["bench", "--sides", "lorafit,hf"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lorafit: error: --sides: 'hf': implementation must be one of lorafit, peft"]
    assert main(["bench", "--from", str(tmp_path / "none.jsonl")]) == 2
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert main(["bench", "--from", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not a JSON line" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "task: unknown task 'nope'"),
    (["--sides", "peft@bf16", "--task", "nope"], "task: unknown task 'nope'"),  # the baseline's task too
    (["--epochs", "0"], "--epochs must be > 0, got 0.0"),
    (["--length-buckets", "1000"], "--length-buckets must be at most --max-length 128"),
    (["--peak-seconds", "-1"], "--peak-seconds must be > 0, got -1.0"),
    (["--sides", "lorafit,lorafit+step_graph"], "--compile-mode step-graph captures CUDA graphs: it needs --device cuda"),
])
def test_a_bad_workload_is_refused_before_anything_is_measured(argv, message, monkeypatch, capsys):
    # The workers would refuse it too, but after the matmul peak or a whole side's run.
    from lorafit.bench import runner

    def no_worker(spec, threads):
        raise AssertionError(f"a {spec['mode']} worker started")

    monkeypatch.setattr(runner, "run_worker", no_worker)
    assert main(["bench", "train", *argv]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"lorafit: error: {message}") and "measuring" not in out


@pytest.mark.parametrize("mode, sides, message", [
    ("infer", "lorafit@bf16,peft@bf16", "--sides peft@bf16: bench infer measures lorafit's models only"),
    ("memory", "peft@fp32", "--sides peft@fp32: bench memory measures lorafit's models only"),
    ("memory", "lorafit@fp32,lorafit@bf16", "--sides lorafit@fp32,lorafit@bf16: bench memory compares LoRA"),
])
def test_sides_infer_and_memory_would_not_measure_are_refused(mode, sides, message, monkeypatch, capsys):
    # They used to be dropped without a word: only the first lorafit side was timed.
    from lorafit.bench import runner

    monkeypatch.setattr(runner, "run_worker", lambda spec, threads: pytest.fail("a worker started"))
    assert main(["bench", mode, "--sides", sides]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lorafit: error: {message}")


def test_an_output_that_cannot_be_written_is_refused_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    from lorafit.bench import runner

    monkeypatch.setattr(runner, "run_worker", lambda spec, threads: pytest.fail("a worker started"))
    (tmp_path / "a-file").write_text("")
    for argv, message in [(["--output", str(tmp_path)], f"--output {tmp_path}: is a directory"),
                          (["--plot", str(tmp_path)], f"--plot {tmp_path}: is a directory"),
                          (["--output", str(tmp_path / "a-file" / "b.jsonl")], "a-file: exists and is not a directory")]:
        assert main(["bench", "train", *argv]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("lorafit: error: --") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.slow
def test_infer_and_memory_modes(tmp_path):
    out = tmp_path / "infer.jsonl"
    assert main(["bench", "infer", *TINY, "--output", str(out)]) == 0
    runs = [r for r in _records(out) if r["kind"] == "measurement"]
    assert [r["variant"] for r in runs] == ["base", "unmerged", "merged"]
    assert {r["precision"] for r in runs} == {"fp32"}  # a plain lorafit side infers in fp32
    assert all(r["latency_ms_b1"] > 0 and r["latency_p90_ms_b32"] >= r["latency_ms_b32"] for r in runs)
    assert all(r["warmup_inputs"] == 60 for r in runs)  # an untimed pass over the 60 timed inputs
    # One worker times the three variants interleaved: one environment, and a paired ratio per
    # input for each LoRA variant against the base model.
    assert len({json.dumps(r["environment"], sort_keys=True) for r in runs}) == 1
    assert "paired_overhead_b1" not in runs[0] and all(r["paired_overhead_b32"] > -1 for r in runs[1:])
    ratios = {r["side"]: r for r in _records(out) if r["kind"] == "ratio"}
    assert set(ratios) == {"unmerged", "merged"}
    assert ratios["merged"]["paired_overhead_b1"] == runs[2]["paired_overhead_b1"]  # one repeat: its own value
    # Two precisions in one run: each side times its own three models, with its own base.
    both = tmp_path / "infer-both.jsonl"
    assert main(["bench", "infer", *TINY, "--sides", "lorafit@fp32,lorafit@bf16", "--output", str(both)]) == 0
    runs = [r for r in _records(both) if r["kind"] == "measurement"]
    assert [(r["side"], r["precision"]) for r in runs] == [("lorafit@fp32", "fp32")] * 3 + [("lorafit@bf16", "bf16")] * 3
    # The unmerged model as `lorafit eval --unmerged` holds it: packed per attention block in bf16.
    assert [r.get("packed_groups") for r in runs] == [None, 0, None, None, 6, None]
    assert {(r["infer_side"], r["side"]) for r in _records(both) if r["kind"] == "ratio"} == {
        (side, variant) for side in ("lorafit@fp32", "lorafit@bf16") for variant in ("unmerged", "merged")}
    out = tmp_path / "memory.jsonl"
    assert main(["bench", "memory", *TINY, "--output", str(out)]) == 0
    (ratio,) = [r for r in _records(out) if r["kind"] == "ratio"]
    assert 0 < ratio["memory_ratio"] < 1.5


def test_vary_seed_gives_each_round_its_own_seed(tmp_path):
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "train", *TINY[:-6], "--repeats", "2", "--threads", "1", "--no-peak", "--vary-seed",
                 "--seed", "3", "--sides", "lorafit@fp32", "--output", str(out)]) == 0
    runs = [r for r in _records(out) if r["kind"] == "measurement"]
    assert [(r["repeat"], r["settings"]["seed"]) for r in runs] == [(0, 3), (1, 4)]
    (summary,) = [r for r in _records(out) if r["kind"] == "summary"]
    assert summary["dev_metric"]["n"] == 2  # the median is over both seeds


def test_a_bench_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    from lorafit.bench import runner

    real, calls = runner.run_worker, []

    def second_side_dies(spec, threads):
        calls.append(spec["side"]["impl"])
        if len(calls) == 2:
            raise RuntimeError("bench worker failed (killed)")
        return real(spec, threads)

    monkeypatch.setattr(runner, "run_worker", second_side_dies)
    out = tmp_path / "bench.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        main(["bench", "train", *TINY, "--no-peak", "--sides", "lorafit@fp32,lorafit", "--output", str(out)])
    kept = _records(out)
    assert [r["side"] for r in kept if r["kind"] == "measurement"] == ["lorafit@fp32"]
    assert any(r["kind"] == "summary" and r["side"] == "lorafit@fp32" for r in kept)


def test_a_failed_peak_measurement_costs_the_percent_of_peak_only(tmp_path, monkeypatch, capsys):
    from lorafit.bench import runner

    real = runner.run_worker

    def peak_dies(spec, threads):
        if spec["mode"] == "peak":
            raise RuntimeError("bench worker failed (peak lorafit):\nRuntimeError: CUDA graph capture failed")
        return real(spec, threads)

    monkeypatch.setattr(runner, "run_worker", peak_dies)
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "train", *TINY, "--sides", "lorafit@fp32", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the matmul peak (start) was not measured: RuntimeError: CUDA graph capture failed" in printed
    assert "the matmul peak (end) was not measured: RuntimeError: CUDA graph capture failed" in printed
    kept = _records(out)
    assert not any(r["kind"] == "peak" for r in kept)
    (summary,) = [r for r in kept if r["kind"] == "summary"]
    assert summary["examples_per_second"]["median"] > 0 and "percent_of_peak" not in summary


# Transformers' Trainer asks PEFT's model a deprecated question of its own; not lorafit's to answer.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_the_baseline_trains_the_same_weights_for_the_same_seed(monkeypatch):
    """Its head and LoRA factors are initialised after a seed, as in Hugging Face's own scripts:
    two runs of one seed in one process (the generator moved on in between) train the same weights."""
    import peft
    import torch

    from lorafit.bench.baseline import peft_train
    from lorafit.bench.spec import Side, Workload

    models = []
    get_peft_model = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: models.append(get_peft_model(*a, **k)) or models[-1])
    work = Workload(task="rte", batch_size=8, max_train_samples=16, max_eval_samples=8, max_length=32, threads=1, seed=5)
    results = [peft_train(work, Side("peft", "fp32")) for _ in range(2)]
    assert results[0]["dev_metric"] == results[1]["dev_metric"]
    first, second = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in models)
    assert first.keys() == second.keys() and any("classifier" in n for n in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
