"""The command line end to end on the real embedded model, and its error handling.

Everything runs in this process through ``lorafit.cli.main(argv)`` (which returns the exit code);
one test starts the real ``python -m lorafit.cli`` entry point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.cli import main

# PEFT and this transformers version disagree about a deprecated property; not lorafit's concern.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SMALL = ["--task", "mrpc", "--max-train-samples", "64", "--max-eval-samples", "40", "--batch-size", "8",
         "--max-length", "64", "--no-progress", "--num-threads", "2", "--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained by ``lorafit train``, and what the command printed."""
    run = tmp_path_factory.mktemp("cli") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *SMALL, "--max-steps", "24", "--eval-steps", "12", "--output-dir", str(run)]) == 0
    return run, out.getvalue()


@pytest.fixture
def trained_run(trained):
    return trained[0]


def test_train_prints_metric_and_adapter_location(trained):
    run, printed = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["task"] == "mrpc"
    assert set(summary["best_metrics"]) == {"accuracy", "f1"}
    assert f"dev accuracy: {summary['best_metric']:.4f} (best epoch {summary['best_epoch']}); f1 " in printed
    assert f"adapter saved to {run / 'adapter'}" in printed


def test_eval_reproduces_the_best_dev_metric(trained_run, capsys):
    assert main(["eval", str(trained_run), "--max-eval-samples", "40"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    best = json.loads((trained_run / "summary.json").read_text())["best_metrics"]
    assert metrics["accuracy"] == pytest.approx(best["accuracy"], abs=1e-9)
    assert metrics["f1"] == pytest.approx(best["f1"], abs=1e-9)


def test_eval_merged_equals_unmerged(trained_run, capsys):
    main(["eval", str(trained_run), "--max-eval-samples", "40"])
    merged = json.loads(capsys.readouterr().out)
    main(["eval", str(trained_run), "--max-eval-samples", "40", "--unmerged"])
    assert json.loads(capsys.readouterr().out) == merged


def test_predict_then_merge_gives_the_same_predictions(trained_run, tmp_path, capsys):
    pair = ["--text", "The cat sat on the mat .", "--text-pair", "A cat was sitting on the mat ."]
    other = ["--text", "Stocks fell sharply on Monday .", "--text-pair", "He likes green apples ."]
    assert main(["predict", str(trained_run), *pair, *other]) == 0
    from_adapter = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r["probabilities"]) for r in from_adapter] == [{"not_equivalent", "equivalent"}] * 2
    for record in from_adapter:
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    merged = tmp_path / "merged"
    assert main(["merge", str(trained_run), "--output", str(merged)]) == 0
    capsys.readouterr()
    assert main(["predict", str(merged), *pair, *other]) == 0
    from_merged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in from_merged] == [r["label"] for r in from_adapter]
    for a, b in zip(from_adapter, from_merged):
        for label in a["probabilities"]:
            assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-5)


def test_merged_model_loads_in_vanilla_transformers(trained_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lorafit.inference import load_trained

    out = tmp_path / "plain"
    main(["merge", str(trained_run), "--output", str(out)])
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    trained = load_trained(trained_run, merge=False)  # the LoRA branch computed separately
    batch = trained.tokenizer(["a b c", "longer sentence here ."], ["x", "y z"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, trained.model(**batch).logits, atol=1e-5, rtol=0)


def test_peft_loads_the_adapter_and_gives_the_same_dev_metric(trained_run, capsys):
    from peft import PeftModel

    from lorafit.data import encode_split, get_task, load_split
    from lorafit.evaluation import predict_logits
    from lorafit.metrics import compute_metrics
    from lorafit.models import load_model, load_tokenizer

    main(["eval", str(trained_run), "--max-eval-samples", "40"])
    ours = json.loads(capsys.readouterr().out)
    base, _ = load_model("minilm", 2)
    peft_model = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    task = get_task("mrpc")
    dev = encode_split(load_split(task, "validation"), load_tokenizer("minilm"), 64).select(np.arange(40))
    logits = predict_logits(peft_model, dev, 64, 0)
    theirs = compute_metrics(task, {"validation": (logits, dev.labels)})
    assert theirs == pytest.approx(ours, abs=1e-9)


def test_predict_reads_a_file(trained_run, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("first sentence .\tsecond sentence .\nanother one .\tand its pair .\n")
    assert main(["predict", str(trained_run), "--input", str(inputs)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_predict_refuses_examples_that_do_not_fit_the_task(trained_run, tmp_path, capsys):
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a .\tb .\nc .\n")
    for argv, message in [
        (["--text", "one sentence ."], "predict: mrpc is a sentence-pair task (sentence1, sentence2), got single sentences"),
        (["--text", "a", "--text-pair", "b", "--text-pair", "c"], "predict: 2 --text-pair for 1 --text"),
        (["--text", "a", "--text", "b", "--text-pair", "c"], "predict: 1 --text-pair for 2 --text"),
        (["--input", str(mixed)], "a sentence pair or none is (example 2 differs from example 1)"),
        (["--input", str(mixed), "--text-pair", "x"], "predict: --text-pair goes with --text"),
    ]:
        assert main(["predict", str(trained_run), *argv]) == 2
        out, err = capsys.readouterr()
        (line,) = err.strip().splitlines()
        assert message in line and not out


def test_predict_reads_quotes_in_a_tsv_as_text(trained_run, tmp_path, capsys):
    # As training reads TSV: a quote is part of the text, balanced or not.
    inputs = tmp_path / "in.tsv"
    inputs.write_text('sentence1\tsentence2\n"The witness" said no.\tHe said "no.\n')
    assert main(["predict", str(trained_run), "--input", str(inputs)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["text"], record["text_pair"]) == ('"The witness" said no.', 'He said "no.')
    inputs.write_text("sentence1\tsentence2\na\tb\tc\n")
    assert main(["predict", str(trained_run), "--input", str(inputs)]) == 2
    assert f"--input {inputs} line 2: expected 2 tab-separated fields, got 3" in capsys.readouterr().err


def test_an_adapter_peft_saved_evaluates_and_predicts(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from lorafit.models import load_model

    base, _ = load_model("minilm", 2)
    config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    get_peft_model(base, config).save_pretrained(tmp_path / "peft")  # no lorafit metadata: labels from the head
    assert main(["eval", str(tmp_path / "peft"), "--task", "mrpc", "--max-eval-samples", "16"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"accuracy", "f1"}
    assert main(["predict", str(tmp_path / "peft"), "--text", "a", "--text-pair", "b"]) == 0
    assert set(json.loads(capsys.readouterr().out)["probabilities"]) == {"LABEL_0", "LABEL_1"}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "--lora", "False"], "unrecognized arguments: --lora False"),
        (["train", "--group-by-length", "False"], "unrecognized arguments: False"),
        (["train", "--learning-rate", "fast"], "--learning-rate: invalid float value"),
        (["train", "--method", "adapter"], "--method: invalid choice"),
        (["train", "--rank", "0"], "--rank must be > 0"),
        (["train", "--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
        (["train", "--resume", "--overwrite"], "give one"),
        (["train", "--task", "mnli2"], "unknown task 'mnli2'"),
        (["train", "--model", "./no/such/model"], "--model ./no/such/model: no such folder"),
        (["train", "--recipe", "paper/roberta-base/nope"], "no such recipe"),
        (["eval", "no-such-run"], "no-such-run: not found"),
        (["merge", "no-such-run", "--output", "x"], "no-such-run: not found"),
        (["predict", "no-such-run"], "give sentences with --text"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*args, "--output-dir", str(tmp_path / "o")] if args[0] == "train" else args
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # argparse adds its usage line
    assert not (tmp_path / "o").exists()


def test_hub_model_offline_names_the_embedded_model(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert main(["train", "--model", "FacebookAI/roberta-base", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--model minilm" in err and "Traceback" not in err


def test_finished_run_is_refused_without_overwrite(trained_run, capsys):
    argv = ["train", *SMALL, "--max-steps", "24", "--eval-steps", "12", "--output-dir", str(trained_run)]
    assert main(argv) == 2
    assert "holds a finished run; pass --overwrite" in capsys.readouterr().err


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "adapter_config.json").write_text("{not json")
    assert main(["eval", str(run)]) == 2
    assert "adapter_config.json: not valid JSON" in capsys.readouterr().err


def test_the_entry_point_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "lorafit.cli", "--help"], capture_output=True, text=True,
                            timeout=120, check=True)
    for command in ("train", "eval", "predict", "merge", "sweep", "report", "data"):
        assert command in result.stdout


def test_a_reader_that_stops_early_gets_no_error_message():
    # `lorafit recipes | head -0`: the reader is gone before the first write.
    proc = subprocess.Popen([sys.executable, "-m", "lorafit.cli", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (1, "")


def test_a_broken_pipe_other_than_stdout_is_still_reported(monkeypatch, capsys):
    import lorafit.cli

    def worker_gone(args):  # a pipe to another process closed, while stdout is fine
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(lorafit.cli, "cmd_recipes", worker_gone)
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err == "lorafit: error: Broken pipe\n"


def test_data_stats_prints_sizes_and_lengths(capsys):
    assert main(["data", "stats", "rte"]) == 0
    out = capsys.readouterr().out
    assert "2,490" in out or "2490" in out
    assert "277" in out


def test_custom_csv_task_trains_and_predicts_its_own_labels(tmp_path, capsys):
    words = {"pos": ["great", "lovely", "superb", "fine"], "neg": ["awful", "bad", "dreadful", "poor"]}
    rows = [(f"a {w} film , really {w} .", label) for label, ws in words.items() for w in ws] * 5
    for name, part in (("train.csv", rows), ("dev.csv", rows[::5])):
        lines = ["review,sentiment"] + [f'"{text}",{label}' for text, label in part]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--train-file", str(tmp_path / "train.csv"), "--validation-file", str(tmp_path / "dev.csv"),
                 "--text-columns", "review", "--label-column", "sentiment", "--max-steps", "4", "--batch-size", "8",
                 "--no-progress", "--num-threads", "2", "--output-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "custom" and set(summary["best_metrics"]) == {"accuracy", "f1"}
    capsys.readouterr()
    assert main(["predict", str(run), "--text", "a superb film ."]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["probabilities"]) == {"neg", "pos"}
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["best_metrics"]["accuracy"])


def test_help_states_each_default_once():
    from lorafit.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.option_strings[0]: a.help for a in train_parser._actions if a.help and a.option_strings}
    assert all(text.count("(default:") <= 1 for text in helps.values()), helps
    assert helps["--target-modules"].endswith("(default: the architecture's query,value)")
    assert helps["--rank"] == "LoRA rank r (default: 8)"


@pytest.mark.parametrize("progress", [True, False])
def test_no_progress_hides_the_bars_and_loading_never_shows_one(progress, tiny_model_dir, tmp_path, capfd, one_thread):
    # Transformers' per-load "Loading weights" bar is always off (it buried one-line errors);
    # --progress is lorafit's own training bar.
    flag = "--progress" if progress else "--no-progress"
    args = ["train", "--model", str(tiny_model_dir), "--task", "rte", "--max-train-samples", "16",
            "--max-eval-samples", "8", "--max-steps", "1", "--max-length", "32", flag,
            "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert ("step/s" in err) == progress


def test_recipes_lists_model_task_and_source(capsys):
    from lorafit.recipes import list_recipes

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["recipe", "model", "method", "task", "source"]
    assert len(lines) == 1 + len(list_recipes())
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["paper/roberta-base/mrpc"].split()[1:4] == ["FacebookAI/roberta-base", "lora", "mrpc"]
    assert "LoRA paper (Hu et al., ICLR 2022), Appendix D.1, Table 9" in rows["paper/roberta-base/mrpc"]
    assert rows["minilm/full/sst2"].split()[1:4] == ["minilm", "full", "sst2"]
    assert "measured: accuracy 88.1" in rows["minilm/full/sst2"]
    assert main(["recipes", "--names"]) == 0
    assert capsys.readouterr().out.splitlines() == list_recipes()


def test_the_parser_and_predict_import_nothing_they_do_not_use():
    # torch takes about 1.2 s to import and scipy + scikit-learn 1.2 s more: `lorafit --help` and a
    # refused flag need neither, and `predict` (lorafit.predict, lorafit.inference) computes no metric.
    probe = ("import sys, lorafit.cli; lorafit.cli.build_parser(); heavy = ('torch', 'scipy', 'sklearn', 'transformers'); "
             "print(sorted(m for m in heavy if m in sys.modules)); import lorafit.predict; "
             "print(sorted(m for m in heavy if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert done.stdout.splitlines() == ["[]", "['torch']"]
