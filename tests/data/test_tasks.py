"""The task registry: names, spellings, label orders, custom tasks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lorafit.data import TASKS, custom_task, get_task
from lorafit.errors import LorafitError


def test_registry_has_the_eight_glue_tasks_with_hf_label_orders() -> None:
    assert set(TASKS) == {"sst2", "mrpc", "rte", "cola", "stsb", "qnli", "qqp", "mnli"}
    assert TASKS["sst2"].label_names == ("negative", "positive")
    assert TASKS["cola"].label_names == ("unacceptable", "acceptable")
    assert TASKS["mrpc"].label_names == ("not_equivalent", "equivalent")
    assert TASKS["qqp"].label_names == ("not_duplicate", "duplicate")
    assert TASKS["rte"].label_names == TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["stsb"].label_names is None


def test_text_fields_are_hf_column_names() -> None:
    assert TASKS["sst2"].text_fields == ("sentence",)
    assert TASKS["cola"].text_fields == ("sentence",)
    for name in ("mrpc", "rte", "stsb"):
        assert TASKS[name].text_fields == ("sentence1", "sentence2")
    assert TASKS["qnli"].text_fields == ("question", "sentence")
    assert TASKS["qqp"].text_fields == ("question1", "question2")
    assert TASKS["mnli"].text_fields == ("premise", "hypothesis")


def test_metrics_and_eval_splits() -> None:
    assert TASKS["cola"].metric == "matthews_correlation"
    assert TASKS["stsb"].metric == "pearson"
    assert TASKS["stsb"].metrics == ("pearson", "spearmanr")
    assert set(TASKS["mrpc"].metrics) == set(TASKS["qqp"].metrics) == {"accuracy", "f1"}
    for name in ("sst2", "rte", "qnli", "mnli"):
        assert TASKS[name].metric == "accuracy"
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert all(t.eval_splits == ("validation",) for n, t in TASKS.items() if n != "mnli")


def test_num_labels_and_regression() -> None:
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].num_labels == 3 and not TASKS["mnli"].is_regression
    assert TASKS["sst2"].num_labels == 2


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["sst2"].metric = "f1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("sst2", "sst2"),
        ("STS-B", "stsb"),
        ("stsb", "stsb"),
        ("CoLA", "cola"),
        ("MNLI", "mnli"),
        ("glue/mrpc", "mrpc"),
        (" qqp ", "qqp"),
        ("sts_b", "stsb"),
    ],
)
def test_get_task_accepts_any_spelling(spelling: str, name: str) -> None:
    assert get_task(spelling) is TASKS[name]


def test_get_task_unknown_lists_known_tasks() -> None:
    with pytest.raises(LorafitError) as err:
        get_task("wnli")
    message = str(err.value)
    assert "'wnli'" in message
    for name in TASKS:
        assert name in message


def test_custom_task_infers_sorted_labels_from_csv(tmp_path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\nnice,pos\nbad,neg\nok,neutral\nfine,pos\n")
    task = custom_task(path, ["text"], "label", name="mine")
    assert task.name == "mine"
    assert task.glue_dir is None
    assert task.text_fields == ("text",)
    assert task.label_names == ("neg", "neutral", "pos")
    assert task.metric == "accuracy" and task.metrics == ("accuracy",)


def test_custom_task_sorts_integer_labels_numerically(tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"a": "x", "b": "y", "y": v}) for v in (10, 2, 1, 2)) + "\n")
    task = custom_task(path, ["a", "b"], "y")
    assert task.label_names == ("1", "2", "10")
    assert task.text_fields == ("a", "b")


def test_custom_binary_task_reports_f1(tmp_path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("s\tl\na\t0\nb\t1\n")
    assert custom_task(path, ["s"], "l").metrics == ("accuracy", "f1")


def test_custom_regression_task_does_not_read_labels(tmp_path) -> None:
    task = custom_task(tmp_path / "not-read.csv", ["s1", "s2"], "score", regression=True)
    assert task.is_regression and task.num_labels == 1
    assert task.metric == "pearson"


def test_custom_task_with_one_label_value_is_an_error(tmp_path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(LorafitError, match=r"train\.csv.*'label'.*1 distinct"):
        custom_task(path, ["text"], "label")


def test_custom_task_explicit_label_names(tmp_path) -> None:
    task = custom_task(tmp_path / "unused.csv", ["t"], "l", label_names=["b", "a"])
    assert task.label_names == ("b", "a")
