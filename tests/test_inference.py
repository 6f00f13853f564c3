"""Inference from a trained model: the precision it computes in, and what that buys.

A bf16 run evaluated in fp32 reports a slightly different metric than its training did; evaluated
in the precision it trained in (the default), unmerged, it reports the same one exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.config import make_config
from lorafit.errors import LorafitError, LorafitWarning
from lorafit.inference import (
    TASK_FILE,
    evaluate_trained,
    export_merged,
    inference_precision,
    load_trained,
)


def test_trained_precision_is_recorded_beside_the_adapter_and_the_merged_model(bf16_run, tmp_path, bf16_cpu):
    run, _ = bf16_run
    assert json.loads((run / "adapter" / "lorafit_adapter.json").read_text())["precision"] == "bf16"
    assert load_trained(run, precision="trained").precision == "bf16"
    assert load_trained(run / "adapter", precision="trained").precision == "bf16"
    assert load_trained(run).precision == "fp32"  # the library's default: fp32 unless asked
    merged = export_merged(run, tmp_path / "merged")
    assert json.loads((merged / TASK_FILE).read_text())["precision"] == "bf16"
    exported = {p.dtype for p in load_trained(merged).model.parameters()}
    assert exported == {torch.float32}  # the export itself keeps full precision
    assert load_trained(merged, precision="trained").precision == "bf16"


def test_eval_in_the_trained_precision_repeats_the_training_metric_exactly(bf16_run, one_thread, bf16_cpu):
    run, summary = bf16_run  # it trained and evaluated on one thread too
    again = evaluate_trained(run, merged=False, max_eval_samples=16)
    assert again == summary["best_metrics"]
    in_fp32 = evaluate_trained(run, merged=False, max_eval_samples=16, precision="fp32")
    assert in_fp32["pearson"] != summary["best_metrics"]["pearson"]  # what eval reported before
    assert in_fp32["pearson"] == pytest.approx(summary["best_metrics"]["pearson"], abs=0.02)


def test_inference_precision_resolves_each_choice(monkeypatch, bf16_cpu):
    from lorafit.bench import env

    assert inference_precision("trained", "bf16") == "bf16"
    assert inference_precision("trained", "fp32") == "fp32"
    assert inference_precision("trained", None) == "fp32"  # PEFT's adapters and plain models record none
    assert inference_precision("trained", "fp16") == "fp32"  # fp16 needs a GPU; inference runs on the CPU
    assert inference_precision("bf16", "fp32") == "bf16" and inference_precision("fp32", "bf16") == "fp32"
    monkeypatch.setattr(env, "cpu_flags", lambda: {f: f == "amx_bf16" for f in env.MATRIX_FLAGS})
    assert inference_precision("auto", "fp32") == "bf16"
    monkeypatch.setattr(env, "cpu_flags", lambda: {f: f == "avx2" for f in env.MATRIX_FLAGS})
    assert inference_precision("auto", "bf16") == "fp32"
    with pytest.raises(LorafitError, match="--precision: expected one of trained, auto, fp32, bf16, got 'fp16'"):
        inference_precision("fp16", None)
    # On a GPU an fp16 run infers in fp16, as it trained; the CPU has no fast fp16 products.
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, an H100
    assert inference_precision("trained", "fp16", gpu) == "fp16"
    assert inference_precision("trained", "bf16", gpu) == "bf16" and inference_precision("trained", None, gpu) == "fp32"
    # A V100 or a T4 only emulates bf16: a bf16 run infers in fp32 there, as on a CPU without bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.warns(LorafitWarning, match="trained in bf16, which this device only emulates"):
        assert inference_precision("trained", "bf16", gpu) == "fp32"
    assert inference_precision("auto", None, gpu) == "fp32"


def test_a_bf16_run_infers_in_fp32_where_the_cpu_only_emulates_bf16(bf16_run, one_thread, avx2_cpu, capsys):
    """bf16 evaluates 3x slower than fp32 on an AVX2-only CPU: `trained` must not pick them there."""
    from lorafit.cli import main

    run, _ = bf16_run
    with pytest.warns(LorafitWarning, match=r"trained in bf16, which this device only emulates .* runs in fp32"):
        trained = load_trained(run, precision="trained")
    assert trained.precision == "fp32"
    assert {p.dtype for p in trained.model.parameters()} == {torch.float32}
    in_fp32 = evaluate_trained(run, merged=False, max_eval_samples=16, precision="fp32")
    assert main(["eval", str(run), "--unmerged", "--max-eval-samples", "16"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == in_fp32
    assert out.err.startswith("lorafit: warning: the model trained in bf16, which this device only emulates")
    assert out.err.count("\n") == 1 and "Warning" not in out.err  # one line, no Python warning format
    # Asked for by name, bf16 runs, and the warning names the flag.
    with pytest.warns(LorafitWarning, match=r"^--precision bf16: bf16 on this CPU \(it has neither AMX nor AVX-512 BF16\)"):
        assert load_trained(run, precision="bf16").precision == "bf16"


def test_cli_runs_the_model_where_device_says(bf16_run, one_thread, capsys, bf16_cpu):
    from lorafit.cli import main

    run, summary = bf16_run
    trained = load_trained(run, precision="trained", device="cpu")
    assert trained.device == torch.device("cpu") and {p.device.type for p in trained.model.parameters()} == {"cpu"}
    assert main(["eval", str(run), "--unmerged", "--max-eval-samples", "16", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == summary["best_metrics"]
    code = main(["predict", str(run), "--text", "a man plays", "--text-pair", "a man is playing", "--device", "cuda"])
    if torch.cuda.is_available():
        assert code == 0 and "score" in json.loads(capsys.readouterr().out)
    else:
        assert code == 2
        assert capsys.readouterr().err.strip() == "lorafit: error: --device cuda: no CUDA device is available (use --device cpu)"


@pytest.mark.gpu
def test_a_gpu_evaluates_and_predicts_as_the_cpu_does(bf16_run, one_thread):
    from lorafit.predict import predict_texts

    run, _ = bf16_run
    on_cpu = evaluate_trained(run, max_eval_samples=16, precision="fp32")
    on_gpu = evaluate_trained(run, max_eval_samples=16, precision="fp32", device="cuda")
    assert on_gpu["pearson"] == pytest.approx(on_cpu["pearson"], abs=1e-3)
    trained = load_trained(run, precision="trained", device="cuda")
    assert trained.precision == "bf16" and {p.device.type for p in trained.model.parameters()} == {"cuda"}
    pairs = [("a man plays a guitar", "a man is playing"), ("two dogs run", "a cat sleeps on a sofa")]
    gpu_scores = [r["score"] for r in predict_texts(trained, pairs)]
    cpu_scores = [r["score"] for r in predict_texts(load_trained(run, precision="trained"), pairs)]
    assert gpu_scores == pytest.approx(cpu_scores, abs=0.05)


def test_cli_eval_takes_the_precision_and_refuses_an_unknown_one(bf16_run, one_thread, capsys, bf16_cpu):
    from lorafit.cli import main

    run, summary = bf16_run
    assert main(["eval", str(run), "--unmerged", "--max-eval-samples", "16"]) == 0
    assert json.loads(capsys.readouterr().out) == summary["best_metrics"]
    assert main(["eval", str(run), "--precision", "fp16"]) == 2
    assert "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_bf16_inference_stores_the_linears_in_bf16_and_gets_autocasts_outputs(bf16_run, one_thread, bf16_cpu):
    from lorafit.data import collate, encode_split, load_split
    from lorafit.lora import LoRALinear

    run, _ = bf16_run
    for merge in (True, False):
        held = load_trained(run, merge=merge, precision="trained")  # bf16: the run's precision
        plain = load_trained(run, merge=merge, precision="fp32")
        linears = {n: m.weight.dtype for n, m in held.model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(linears.values()) == {torch.bfloat16}  # LoRA's factors too: their input is cast alike
        assert any(".lora_A" in n for n in linears) == (not merge)
        assert any(isinstance(m, LoRALinear) for m in held.model.modules()) == (not merge)
        # Unmerged, each attention block's query and value are packed (and must give the same bits).
        assert all(m._packed is not None for m in held.model.modules() if isinstance(m, LoRALinear))
        data = encode_split(load_split(held.task, "validation", None), held.tokenizer, held.max_length)
        batch = collate(data, list(range(8)), held.tokenizer.pad_token_id)
        batch.pop("labels")
        with torch.inference_mode(), held.autocast():
            ours = held.model(**batch).logits
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_alone = plain.model(**batch).logits
        assert torch.equal(ours, autocast_alone)


@pytest.mark.parametrize("frozen_bf16", [True, False])
def test_a_dora_run_holds_its_base_weights_as_it_trained_and_repeats_its_metric(tmp_path, one_thread, stsb_run,
                                                                                   frozen_bf16, bf16_cpu):
    from lorafit.lora import LoRALinear
    from lorafit.train import train

    # DoRA reads its base weight outside autocast (the column norm): it must be held as it trained.
    summary = train(make_config(**stsb_run, precision="bf16", use_dora=True, frozen_bf16=frozen_bf16,
                                output_dir=str(tmp_path / "run")))
    held = load_trained(tmp_path / "run", merge=False, precision="trained")
    layers = [m for m in held.model.modules() if isinstance(m, LoRALinear)]
    expected = torch.bfloat16 if frozen_bf16 else torch.float32
    assert layers and all(m.base_layer.weight.dtype == expected for m in layers)
    assert all(m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32 for m in layers)
    assert held.model.classifier.weight.dtype == torch.bfloat16
    assert evaluate_trained(tmp_path / "run", merged=False, max_eval_samples=16) == summary["best_metrics"]
