"""The bench's pieces without subprocesses: side specs, the FLOP count, the peak, the summary."""

from __future__ import annotations

import os
import sys

import pytest
from transformers import BertConfig, BertForSequenceClassification

from lorafit.bench import env as env_module
from lorafit.bench.env import environment, physical_cores
from lorafit.bench.flops import (
    first_row_flops_per_token,
    layer_shapes,
    linear_flops_per_token,
    lora_flops,
    matmul_peak,
)
from lorafit.bench.spec import Side
from lorafit.bench.summary import format_table, summarize
from lorafit.errors import LorafitError
from lorafit.lora import LoRAConfig, inject_lora


def test_side_specs_parse_precision_and_switches():
    assert Side.parse("peft@bf16") == Side("peft", "bf16")
    side = Side.parse("lorafit@bf16+compile-frozen_bf16")
    assert side == Side("lorafit", "bf16", (("compile", True), ("frozen_bf16", False)))
    assert side.label == "lorafit@bf16+compile-frozen_bf16"
    assert Side.parse("lorafit").precision is None
    assert Side.parse("peft@bf16+group_by_length") == Side("peft", "bf16", (("group_by_length", True),))


def test_a_side_names_its_allocator_and_its_worker_gets_that_one_alone(tmp_path, monkeypatch):
    from lorafit import allocator
    from lorafit.bench.runner import worker_env
    from lorafit.bench.spec import Workload, lorafit_config

    assert Side.parse("lorafit").allocator == "auto" and Side.parse("peft@bf16").allocator == "system"
    assert Side.parse("peft@bf16+tcmalloc").allocator == "tcmalloc"
    assert Side.parse("lorafit-tcmalloc").allocator == "system"
    assert Side.parse("lorafit+jemalloc").label == "lorafit+jemalloc"
    assert lorafit_config(Workload(), Side.parse("lorafit-tcmalloc"), str(tmp_path)).allocator == "system"
    assert lorafit_config(Workload(), Side.parse("lorafit"), str(tmp_path)).allocator == "auto"
    # An allocator preloaded in the bench's own environment does not leak into a side's worker;
    # other preloaded libraries do pass on.
    monkeypatch.setattr(allocator, "library", lambda name: f"lib/lib{allocator.LIBRARIES[name][0]}.so.9")
    monkeypatch.setenv("LD_PRELOAD", "vendor/libjemalloc.so.2:vendor/libother.so")
    assert worker_env(2, Side.parse("peft@bf16"), "cpu")["LD_PRELOAD"] == "vendor/libother.so"
    env = worker_env(2, Side.parse("peft@bf16+tcmalloc"), "cpu")
    assert env["LD_PRELOAD"] == "lib/libtcmalloc_minimal.so.9:vendor/libother.so" and env["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("LD_PRELOAD", "vendor/libjemalloc.so.2")
    assert "LD_PRELOAD" not in worker_env(1, Side.parse("lorafit-tcmalloc"), "cpu")


def test_a_variant_side_sets_that_variants_config_fields(tmp_path):
    from lorafit.bench.spec import Workload, lorafit_config

    side = Side.parse("lorafit@bf16+dora-group_by_length")
    assert side.variant == "dora" and Side.parse("lorafit+compile").variant is None
    expected = {"dora": ("use_dora", True), "rslora": ("use_rslora", True),
                "loraplus": ("loraplus_lr_ratio", 16.0), "pissa": ("init_lora_weights", "pissa")}
    for name, (field, value) in expected.items():
        cfg = lorafit_config(Workload(), Side.parse(f"lorafit+{name}-group_by_length"), str(tmp_path))
        assert getattr(cfg, field) == value and cfg.group_by_length is False
    plain = lorafit_config(Workload(), Side.parse("lorafit"), str(tmp_path))
    assert (plain.use_dora, plain.use_rslora, plain.loraplus_lr_ratio, plain.init_lora_weights) == (
        False, False, None, "default")


def test_a_step_graph_side_compiles_and_captures_whole_steps(tmp_path):
    from lorafit.bench.spec import Workload, lorafit_config

    cfg = lorafit_config(Workload(device="cuda"), Side.parse("lorafit@bf16+step_graph"), str(tmp_path))
    assert (cfg.compile, cfg.compile_mode, cfg.precision) == (True, "step-graph", "bf16")
    assert lorafit_config(Workload(), Side.parse("lorafit+compile"), str(tmp_path)).compile_mode == "auto"


@pytest.mark.parametrize("text, word", [("hf", "implementation"), ("peft@int8", "precision"),
                                         ("peft+compile", "option"), ("lorafit+turbo", "option"),
                                         ("peft-fused_optimizer", "option"), ("peft+dora", "option"),
                                         ("lorafit-dora", r"\+dora"), ("lorafit-step_graph", r"\+step_graph")])
def test_bad_side_specs_name_what_is_wrong(text, word):
    with pytest.raises(LorafitError, match=word):
        Side.parse(text)


def test_flop_count_matches_the_hand_count():
    torch_model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99))
    d, f, r, layers = 32, 48, 4, 2
    frozen = layers * (4 * d * d + 2 * d * f)  # q, k, v, o and the two feed-forward matrices
    assert linear_flops_per_token(torch_model, "full") == 6 * frozen
    inject_lora(torch_model, LoRAConfig(r=r, alpha=8, target_modules=["query", "value"]).resolved("bert"))
    lora = layers * 2 * r * (d + d)  # A and B of query and value
    assert linear_flops_per_token(torch_model, "lora") == 4 * frozen + 6 * lora
    assert layer_shapes(torch_model) == {(d, d): 4 * layers, (d, f): layers, (f, d): layers}
    # The last layer cut to its first row: its output projection and feed-forward block, and the query.
    assert first_row_flops_per_token(torch_model, "lora") == {"past_attention": 4 * (d * d + 2 * d * f),
                                                              "query": 4 * d * d + 6 * r * (d + d)}
    torch_model.config.chunk_size_feed_forward = 4  # a layer it cannot cut counts nothing
    assert first_row_flops_per_token(torch_model, "lora") == {"past_attention": 0, "query": 0}


def test_a_last_layer_cut_to_its_first_row_counts_its_cut_part_once_an_example():
    first_row = {"past_attention": 30, "query": 5}
    # 16 examples of 53 tokens: uncut, every token pays the whole count.
    assert lora_flops(100, first_row, None, 848, 16) == 100 * 848
    assert lora_flops(100, first_row, "past_attention", 848, 16) == 70 * 848 + 30 * 16
    assert lora_flops(100, first_row, "query", 848, 16) == 65 * 848 + 35 * 16
    assert lora_flops(100, {}, "query", 848, 16) == 100 * 848  # a model whose last layer is not cut


def test_matmul_peak_reports_square_each_shape_and_the_mix():
    peaks = matmul_peak("cpu", ("fp32",), square=64, tokens=16, shapes={(32, 32): 4, (32, 48): 1}, budget=0.01)
    assert [p.shape for p in peaks] == ["64x64x64", "16x32x32", "16x32x48", "model"]
    assert all(p.gflops > 0 for p in peaks)


def test_environment_records_cpu_flags_threads_and_versions():
    env = environment("cpu")
    assert set(env["cpu_flags"]) >= {"amx_bf16", "avx512_bf16"}
    assert env["threads"] >= 1 and 1 <= physical_cores() <= (env["logical_cpus"] or 1)
    assert env["allocator"] == "system"  # pytest's process runs on the system's malloc
    assert env["versions"]["torch"] and env["versions"]["lorafit"]
    if os.path.exists("/proc/cpuinfo"):  # Linux: the generation, beyond a VM's generic model name
        assert isinstance(env["cpu_id"]["family"], int) and isinstance(env["cpu_id"]["model"], int)


def test_cpu_identity_is_the_first_processors(tmp_path):
    # Two processors as a VM's /proc/cpuinfo lists them; "model" must not be read from "model name".
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    info = tmp_path / "cpuinfo"
    info.write_text(block.format(n=0, family=26) + block.format(n=1, family=25))
    model, flags, ident = env_module._cpuinfo(str(info))
    assert model == "AMD EPYC" and {"avx512_bf16", "avx2"} <= flags
    assert ident == {"vendor": "AuthenticAMD", "family": 26, "model": 2, "stepping": 1}
    assert env_module._cpuinfo(str(tmp_path / "missing"))[2] == {}


def _measurement(side, impl, eps, metric, repeat, precision="fp32"):
    env = {"cpu": "x", "cpu_flags": {"amx_bf16": False}, "threads": 2, "device": "cpu", "versions": {"torch": "2"}}
    return {"kind": "measurement", "mode": "train", "side": side, "impl": impl, "variant": None, "repeat": repeat,
            "settings": {"task": "mrpc", "model": "minilm", "device": "cpu"}, "environment": env,
            "examples_per_second": eps, "tokens_per_second": eps * 50, "dev_metric": metric, "peak_memory_gib": 1.0,
            "train_seconds": 10.0, "compile_seconds": 0.0, "precision": precision, "metric": "accuracy"}


def test_summary_takes_medians_and_the_ratio_against_the_best_baseline():
    records = [
        _measurement("lorafit", "lorafit", 100.0, 0.80, 0), _measurement("peft@fp32", "peft", 30.0, 0.79, 0),
        _measurement("peft@bf16", "peft", 40.0, 0.78, 0, "bf16"), _measurement("lorafit", "lorafit", 120.0, 0.80, 1),
        _measurement("peft@fp32", "peft", 34.0, 0.79, 1), _measurement("peft@bf16", "peft", 44.0, 0.78, 1, "bf16"),
        {"kind": "peak", "settings": {"task": "mrpc", "model": "minilm", "device": "cpu"},
         "flops_per_token": {"lora": 1_000_000, "full": 0}, "peaks": [{"dtype": "fp32", "shape": "model", "gflops": 10.0}]},
    ]
    out = summarize(records)
    lorafit = next(r for r in out if r["kind"] == "summary" and r["side"] == "lorafit")
    assert lorafit["examples_per_second"]["median"] == 110.0 and lorafit["examples_per_second"]["n"] == 2
    assert lorafit["examples_per_second"]["spread"] == pytest.approx(20 / 110)
    # 5,500 tokens/s x 1 MFLOP per token = 5.5 GFLOP/s of a 10 GFLOP/s peak.
    assert lorafit["achieved_gflops"] == pytest.approx(5.5) and lorafit["percent_of_peak"] == pytest.approx(55)
    (ratio,) = [r for r in out if r["kind"] == "ratio"]
    assert ratio["against"] == "peft@bf16" and ratio["speedup"] == pytest.approx(110 / 42)
    # Round by round too: round k of one side against round k of the other.
    assert ratio["round_speedups"] == pytest.approx([100 / 40, 120 / 44])
    assert ratio["paired_speedup"] == pytest.approx((100 / 40 + 120 / 44) / 2)
    assert "(examples/s, medians; round by round 2.50-2.73x, median 2.61x)" in format_table(records)
    # Two runs' files read together repeat their round numbers: those rounds cannot be paired,
    # unless the runs trained other seeds (--vary-seed --seed 5 after --seed 0).
    (twice,) = [r for r in summarize(records + records) if r["kind"] == "ratio"]
    assert twice["speedup"] == pytest.approx(110 / 42) and "round_speedups" not in twice
    later = [_at(r, seed=5 + r["repeat"]) if r["kind"] == "measurement" else r for r in records]
    (both,) = [r for r in summarize(records + later) if r["kind"] == "ratio"]
    assert both["round_speedups"] == pytest.approx([100 / 40, 120 / 44] * 2)
    # A last layer cut to its first row computed those products once an example, not once a token.
    for extent, once in (("query", 300_000), ("past_attention", 200_000), (True, 300_000), (False, 0)):
        for r in records:
            if r["kind"] == "measurement":
                r["speed"] = {"cls_only_last_layer": extent, "attention": "lorafit_vectorised_masks"}
            elif r["kind"] == "peak":
                r["flops_per_token"]["lora_first_row"] = {"past_attention": 200_000, "query": 100_000}
        cut = next(r for r in summarize(records) if r["kind"] == "summary" and r["side"] == "lorafit")
        assert cut["achieved_gflops"] == pytest.approx(((1_000_000 - once) * 5_500 + once * 110) / 1e9), extent
    assert ratio["dev_metric_difference"] == pytest.approx(0.02)
    # A second peak (the run's end) at a faster moment of the machine: % of peak divides by the faster.
    later = {**records[-1], "when": "end", "peaks": [{"dtype": "fp32", "shape": "model", "gflops": 20.0}]}
    for r in records:
        r.pop("speed", None)
    both = next(r for r in summarize([*records, later]) if r["kind"] == "summary" and r["side"] == "lorafit")
    assert both["peak_gflops"] == 20.0 and both["percent_of_peak"] == pytest.approx(27.5)
    assert "matmul peak (GFLOP/s) (at the end): fp32 model 20" in format_table([*records, later])
    table = format_table(records)
    # A side without @PRECISION (lorafit's default is auto) shows what it resolved to.
    assert table.splitlines()[0].startswith("mrpc minilm cpu: lorafit (fp32) = 2.62x peft@bf16")
    assert "\nlorafit (fp32) " in table and "\npeft@bf16 " in table
    assert table.splitlines()[-1].startswith("x (flags: none)")  # no cpu_id: a record from before it
    zen5 = [{**r, "environment": {**r["environment"], "cpu_id": {"family": 26, "model": 2}}} if "environment" in r
            else r for r in records]
    assert format_table(zen5).splitlines()[-1].startswith("x family 26 model 2 (flags: none)")


def _at(record, **settings):
    return {**record, "settings": {**record["settings"], **settings}}


def test_workloads_read_together_are_summarised_and_compared_apart():
    # Two runs at different batch sizes (e.g. `--from b16.jsonl --from b64.jsonl`): never pooled;
    # rounds of one workload that differ only by seed (--vary-seed) are.
    b16 = [_at(_measurement("lorafit", "lorafit", 100.0, 0.80, 0), batch_size=16, seed=0),
           _at(_measurement("lorafit", "lorafit", 120.0, 0.82, 1), batch_size=16, seed=1),
           _at(_measurement("peft@fp32", "peft", 50.0, 0.80, 0), batch_size=16, seed=0)]
    b64 = [_at(_measurement("lorafit", "lorafit", 400.0, 0.79, 0), batch_size=64, seed=0),
           _at(_measurement("peft@fp32", "peft", 100.0, 0.80, 0), batch_size=64, seed=0)]
    out = summarize(b16 + b64)
    lorafit = sorted(r["examples_per_second"]["median"] for r in out if r["kind"] == "summary" and r["side"] == "lorafit")
    assert lorafit == [110.0, 400.0]
    assert sorted(r["speedup"] for r in out if r["kind"] == "ratio") == [pytest.approx(2.2), pytest.approx(4.0)]
    table = format_table(b16 + b64).splitlines()
    assert table[0].startswith("mrpc minilm cpu (batch_size 16): lorafit (fp32) = 2.20x peft@fp32")
    assert table[1].startswith("mrpc minilm cpu (batch_size 64): lorafit (fp32) = 4.00x peft@fp32")
    assert "mrpc minilm cpu (batch_size 64):" in table
    # One workload alone is named without its settings, as before.
    assert format_table(b16).splitlines()[0].startswith("mrpc minilm cpu: lorafit (fp32) = 2.20x")


def test_a_switched_baseline_is_a_second_comparison_not_the_best_of_one():
    records = [_measurement("lorafit", "lorafit", 100.0, 0.80, 0), _measurement("peft@bf16", "peft", 40.0, 0.78, 0, "bf16"),
               _measurement("peft@bf16+group_by_length", "peft", 90.0, 0.79, 0, "bf16"),
               _measurement("peft@fp32", "peft", 30.0, 0.79, 0)]
    ratios = [r for r in summarize(records) if r["kind"] == "ratio"]
    assert [(r["against"], r["speedup"]) for r in ratios] == [
        ("peft@bf16", pytest.approx(2.5)), ("peft@bf16+group_by_length", pytest.approx(100 / 90))]
    assert format_table(records).splitlines()[0].endswith("2.50x peft@bf16 (examples/s, medians); dev metric +2.00 pt")
    # The table's columns line up however long a side's name (here 34 characters).
    records.append(_measurement("peft@bf16+group_by_length+tcmalloc", "peft", 95.0, 0.79, 0, "bf16"))
    table = format_table(records).split("\n\n")[1].splitlines()
    assert table[0].startswith("side ") and len(table) == 6
    assert len({len(line) for line in table}) == 1  # each cell is padded to its column's width


def test_a_variant_side_is_also_compared_with_plain_lora_at_its_setting():
    peak = {"kind": "peak", "settings": {"task": "mrpc", "model": "minilm", "device": "cpu"},
            "flops_per_token": {"lora": 1_000_000, "full": 0}, "peaks": [{"dtype": "bf16", "shape": "model", "gflops": 10.0}]}
    records = [_measurement("lorafit@bf16", "lorafit", 100.0, 0.80, 0, "bf16"),
               _measurement("lorafit@bf16+dora", "lorafit", 80.0, 0.81, 0, "bf16"),
               _measurement("peft@bf16", "peft", 40.0, 0.78, 0, "bf16"), peak]
    out = summarize(records)
    ratios = [(r["side"], r["against"], r["speedup"]) for r in out if r["kind"] == "ratio"]
    assert ratios == [("lorafit@bf16", "peft@bf16", pytest.approx(2.5)), ("lorafit@bf16+dora", "peft@bf16", pytest.approx(2.0)),
                      ("lorafit@bf16+dora", "lorafit@bf16", pytest.approx(0.8))]
    # % of peak counts plain LoRA's FLOPs, so it is given for plain LoRA only.
    dora = next(r for r in out if r["kind"] == "summary" and r["side"] == "lorafit@bf16+dora")
    assert "percent_of_peak" not in dora
    assert "lorafit@bf16+dora = 0.80x lorafit@bf16 (examples/s, medians); dev metric +1.00 pt" in format_table(records)


def test_peft_missing_is_one_clear_error(monkeypatch):
    from lorafit.bench.baseline import require_peft

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(LorafitError, match=r"pip install 'lorafit\[bench\]'"):
        require_peft()


@pytest.mark.parametrize("text, grouped", [("peft@bf16", False), ("peft@bf16+group_by_length", True)])
def test_the_baseline_groups_by_length_only_when_asked(tmp_path, text, grouped):
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lorafit.bench.baseline import training_arguments
    from lorafit.bench.spec import Workload

    args = training_arguments(Workload(batch_size=2), Side.parse(text), str(tmp_path), steps=4)
    assert (args.train_sampling_strategy == "group_by_length") is grouped and args.bf16 and args.per_device_train_batch_size == 2
    model = BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50))
    rows = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": 0} for n in (3, 9, 5, 7)]
    sampler = Trainer(model=model, args=args, train_dataset=rows)._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) is grouped


def test_the_baseline_scores_each_prediction_against_its_own_label_when_grouped(tmp_path):
    import torch
    from transformers import Trainer

    from lorafit.bench.baseline import predict_with_labels, training_arguments
    from lorafit.bench.spec import Workload

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50,
        num_labels=1)).eval()
    # Lengths out of order, so a length-grouped evaluation visits them in another order; each label
    # is the row's own number, so a prediction paired with another row's label shows.
    rows = [{"input_ids": [(7 * i + j) % 50 for j in range(n)], "attention_mask": [1] * n, "labels": float(i)}
            for i, n in enumerate((3, 12, 5, 9, 4, 11, 6))]
    args = training_arguments(Workload(eval_batch_size=2), Side.parse("peft@fp32+group_by_length"), str(tmp_path), 1)

    def pad(batch):
        width = max(len(r["input_ids"]) for r in batch)
        return {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch]),
                "attention_mask": torch.tensor([r["attention_mask"] + [0] * (width - len(r["input_ids"])) for r in batch]),
                "labels": torch.tensor([r["labels"] for r in batch])}

    logits, labels = predict_with_labels(Trainer(model=model, args=args, data_collator=pad), rows)
    assert sorted(labels.tolist()) == [float(i) for i in range(len(rows))] and labels.tolist() != sorted(labels.tolist())
    with torch.no_grad():
        own = {float(r["labels"]): model(input_ids=torch.tensor([r["input_ids"]])).logits.item() for r in rows}
    assert [pytest.approx(own[y], abs=1e-5) for y in labels.tolist()] == logits.reshape(-1).tolist()


def _latency(side: str, variant: str, b1: float, b32: float, precision: str | None = None) -> dict:
    env = {"cpu": "x", "cpu_flags": {"amx_bf16": True}, "threads": 2, "device": "cpu", "versions": {"torch": "2"}}
    return {"kind": "measurement", "mode": "infer", "side": side, "impl": "lorafit", "variant": variant, "repeat": 0,
            "precision": precision,
            "settings": {"task": "sst2", "model": "minilm", "device": "cpu"}, "environment": env,
            "latency_ms_b1": b1, "latency_p90_ms_b1": b1, "latency_ms_b32": b32, "latency_p90_ms_b32": b32,
            "examples_per_second_b32": 32_000 / b32}


def test_inference_runs_in_two_precisions_read_together_compare_each_with_its_own_base():
    records = [_latency("lorafit@fp32", "base", 6.0, 120.0), _latency("lorafit@fp32", "merged", 6.0, 120.0),
               _latency("lorafit@bf16", "base", 5.0, 40.0), _latency("lorafit@bf16", "merged", 5.5, 44.0)]
    ratios = {r["infer_side"]: r for r in summarize(records) if r["kind"] == "ratio"}
    assert ratios["lorafit@fp32"]["overhead_b32"] == pytest.approx(0.0)
    assert ratios["lorafit@bf16"]["overhead_b1"] == pytest.approx(0.1)  # not 5.5 against fp32's 6.0
    table = format_table(records)
    assert "LoRA merged (lorafit@bf16) latency vs base: +10.0% at batch 1, +10.0% at batch 32" in table
    assert "\nmerged (lorafit@bf16) " in table and "\nbase (lorafit@fp32) " in table


def test_inference_lines_name_the_precision_a_plain_side_ran_in():
    # A plain "lorafit" side infers in fp32, while in the train mode it is lorafit's default
    # precision: the table says which, alone and beside a side that names its own.
    alone = format_table([_latency("lorafit", "base", 6.0, 120.0, "fp32"), _latency("lorafit", "merged", 6.6, 120.0, "fp32")])
    assert "LoRA merged (fp32) latency vs base: +10.0% at batch 1" in alone
    assert "\nmodel, fp32 " in alone
    both = format_table([_latency("lorafit", "base", 6.0, 120.0, "fp32"), _latency("lorafit", "merged", 6.0, 132.0, "fp32"),
                         _latency("lorafit@bf16", "base", 5.0, 40.0, "bf16"), _latency("lorafit@bf16", "merged", 5.0, 40.0, "bf16")])
    assert "LoRA merged (lorafit@fp32) latency vs base: +0.0% at batch 1, +10.0% at batch 32" in both
    assert "\nbase (lorafit@fp32) " in both and "\nmerged (lorafit@bf16) " in both
    older = format_table([_latency("lorafit", "base", 6.0, 120.0), _latency("lorafit", "merged", 6.0, 120.0)])
    assert "LoRA merged latency vs base" in older and "\nmodel " in older  # records from before the field


def test_default_sides_run_the_trainer_in_fp32_where_bf16_is_emulated(avx2_cpu, monkeypatch):
    import torch

    from lorafit.bench.cli import DEFAULT_SIDES, default_sides

    def no_cuda_here(**_):
        raise AssertionError("the bench's own process asked CUDA")

    # There `bf16=True` is not the Trainer's best but 18x slower (one MRPC run would take hours).
    notes = []
    assert default_sides("cpu", notes) == "lorafit,peft@fp32,peft@fp32+group_by_length"
    (note,) = notes
    assert note == ("lorafit bench: bf16 on this CPU (it has neither AMX nor AVX-512 BF16) is emulated, many times "
                    "slower than fp32 (training 30x, evaluation 3x on an AVX2-only EPYC), so the default sides are "
                    "lorafit,peft@fp32,peft@fp32+group_by_length")
    # On a GPU each worker checks its own precision; the bench's process does not start CUDA.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_cuda_here)
    assert default_sides("cuda", notes) == DEFAULT_SIDES and len(notes) == 1


def test_default_sides_keep_bf16_where_the_cpu_multiplies_it(bf16_cpu):
    from lorafit.bench.cli import DEFAULT_SIDES, default_sides

    notes = []
    assert default_sides("cpu", notes) == DEFAULT_SIDES == "lorafit,peft@fp32,peft@bf16,peft@bf16+group_by_length"
    assert notes == []


def test_the_peak_leaves_out_bf16_where_the_cpu_only_emulates_it(avx2_cpu, tiny_model_dir, one_thread):
    from lorafit.bench.spec import Workload
    from lorafit.bench.worker import peak

    work = Workload(task="rte", model=str(tiny_model_dir), batch_size=8, max_train_samples=16, max_length=32)
    record = peak(work, Side("lorafit"), budget=0.01)
    assert {p["dtype"] for p in record["peaks"]} == {"fp32"} and "model" in {p["shape"] for p in record["peaks"]}
    assert record["not_measured"] == {"bf16": "emulated on this CPU (no AMX or AVX-512 BF16)"}
    table = format_table([{"kind": "peak", "mode": "train", "settings": work.as_dict(), **record}])
    assert "bf16 not measured: emulated on this CPU" in table


def test_each_mode_schedules_what_it_measures():
    from lorafit.bench.runner import MEMORY_VARIANTS, schedule

    fp32, bf16, peft = Side.parse("lorafit@fp32"), Side.parse("lorafit@bf16"), Side.parse("peft@bf16")
    assert schedule("train", [fp32, peft, bf16]) == [(fp32, None), (peft, None), (bf16, None)]
    assert schedule("infer", [fp32, bf16, fp32]) == [(fp32, None), (bf16, None)]  # every lorafit side, once
    assert schedule("infer", []) == [(Side.parse("lorafit"), None)]
    assert schedule("memory", [bf16]) == [(bf16, v) for v in MEMORY_VARIANTS]
