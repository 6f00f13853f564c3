"""GLUE test predictions in the server's format, `lorafit predict --split test` and `lorafit submit`."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from lorafit.cli import main
from lorafit.config import make_config
from lorafit.data import get_task
from lorafit.errors import LorafitError
from lorafit.inference import Trained
from lorafit.submit import ALL_SUBMISSION_FILES, SERVER_LABELS, format_predictions, predict_test
from lorafit.train import train

# GLUE's test set sizes, and the file and label vocabulary the server takes for each task.
EXPECTED = {
    "sst2": ("SST-2.tsv", 1_821, {"0", "1"}),
    "mrpc": ("MRPC.tsv", 1_725, {"0", "1"}),
    "rte": ("RTE.tsv", 3_000, {"entailment", "not_entailment"}),
    "cola": ("CoLA.tsv", 1_063, {"0", "1"}),
    "stsb": ("STS-B.tsv", 1_379, None),
}


def random_model(task_name: str, seed: int = 0) -> Trained:
    """A tiny random BERT for the task, with the embedded model's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from lorafit.models import load_tokenizer

    task = get_task(task_name)
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=tokenizer.vocab_size, num_labels=task.num_labels, initializer_range=2.0)
    return Trained(BertForSequenceClassification(config).eval(), tokenizer, task, 64)


def read_tsv(data: str) -> tuple[list[str], list[list[str]]]:
    header, *rows = data.splitlines()
    return header.split("\t"), [row.split("\t") for row in rows]


@pytest.mark.parametrize("task", EXPECTED)
def test_submission_file_has_glue_rows_index_order_and_labels(task: str, one_thread) -> None:
    filename, rows, labels = EXPECTED[task]
    (predictions,) = predict_test(random_model(task), batch_size=256)
    header, body = read_tsv(predictions.to_tsv().decode())
    assert predictions.filename == filename
    assert header == ["index", "prediction"]
    assert len(body) == rows and all(len(row) == 2 for row in body)
    assert [int(row[0]) for row in body] == list(range(rows))
    values = [row[1] for row in body]
    if labels is None:
        scores = np.array(values, dtype=float)
        assert scores.min() >= 0.0 and scores.max() <= 5.0
    else:
        assert set(values) <= labels


def test_labels_follow_the_label_ids_and_stsb_is_clipped() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    assert format_predictions(get_task("rte"), logits) == ["entailment", "not_entailment"]
    assert format_predictions(get_task("sst2"), logits) == ["0", "1"]
    assert format_predictions(get_task("mnli"), np.eye(3, dtype=np.float32)) == list(SERVER_LABELS["mnli"])
    scores = np.array([[-0.7], [2.25], [6.1]], dtype=np.float32)
    assert format_predictions(get_task("stsb"), scores) == ["0.000", "2.250", "5.000"]
    with pytest.raises(LorafitError, match="3 outputs, GLUE has 2 labels"):
        format_predictions(get_task("rte"), np.zeros((1, 3), dtype=np.float32))


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dir, tmp_path_factory):
    """Two runs of the tiny model, RTE and STS-B, two steps each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("submit")
    runs = {}
    for task in ("rte", "stsb"):
        runs[task] = root / task
        train(make_config(task=task, model=str(tiny_model_dir), max_train_samples=16, max_eval_samples=16,
                          batch_size=8, max_length=64, max_steps=2, progress=False, output_dir=str(runs[task])))
    torch.set_num_threads(before)
    return runs


def test_predict_split_test_writes_the_task_file(tiny_runs, tmp_path, capsys, one_thread) -> None:
    out = tmp_path / "preds"
    assert main(["predict", str(tiny_runs["rte"]), "--split", "test", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'RTE.tsv'}"
    header, body = read_tsv((out / "RTE.tsv").read_text())
    assert header == ["index", "prediction"] and len(body) == 3_000 and {row[1] for row in body} <= {"entailment", "not_entailment"}
    # A second run refuses to replace the file unless asked.
    assert main(["predict", str(tiny_runs["rte"]), "--split", "test", "--output", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_submit_zips_one_file_per_task_and_names_the_missing(tiny_runs, tmp_path, capsys, one_thread) -> None:
    bundle = tmp_path / "glue_submission.zip"
    assert main(["submit", str(tiny_runs["rte"]), str(tiny_runs["stsb"] / "adapter"), "--output", str(bundle)]) == 0
    out = capsys.readouterr().out
    with zipfile.ZipFile(bundle) as archive:
        assert archive.namelist() == ["STS-B.tsv", "RTE.tsv"]  # top level, in the server's order
        header, body = read_tsv(archive.read("STS-B.tsv").decode())
    assert header == ["index", "prediction"] and len(body) == 1_379
    missing = [n for n in ALL_SUBMISSION_FILES if n not in ("STS-B.tsv", "RTE.tsv")]
    assert f"missing (the GLUE server expects all 11 files): {', '.join(missing)}" in out


def test_submit_refuses_two_runs_of_one_task_and_writes_nothing(tiny_runs, tmp_path, capsys) -> None:
    bundle = tmp_path / "twice.zip"
    assert main(["submit", str(tiny_runs["rte"]), str(tiny_runs["rte"] / "adapter"), "--output", str(bundle)]) == 2
    assert "are both rte models; give one run per task" in capsys.readouterr().err
    assert not bundle.exists()


def test_submit_refuses_custom_tasks(tmp_path, one_thread) -> None:
    trained = random_model("rte")
    trained.task = None
    with pytest.raises(LorafitError, match="trained on no task, not a GLUE task"):
        predict_test(trained, where="model")


def test_predict_split_needs_an_output_folder(tiny_runs, capsys) -> None:
    assert main(["predict", str(tiny_runs["rte"]), "--split", "test"]) == 2
    assert "--split test needs --output DIR" in capsys.readouterr().err
