"""GLUE test splits: the vendored files (unlabeled, with the server's index), and --data-dir."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lorafit.data import get_task
from lorafit.data.unlabeled import glue_test_splits, load_test_split
from lorafit.errors import LorafitError

REPO = Path(__file__).resolve().parents[2]
SHARED_GLUE = REPO.parent / "shared" / "glue"
PACKAGE_SOURCES = REPO / "src" / "lorafit" / "data" / "glue" / "SOURCES.md"

# GLUE's test set sizes.
TEST_ROWS = {"sst2": 1_821, "mrpc": 1_725, "rte": 3_000, "cola": 1_063, "stsb": 1_379}


@pytest.mark.parametrize("task", TEST_ROWS)
def test_vendored_test_split_rows_and_index(task: str) -> None:
    test = load_test_split(task)
    assert len(test) == TEST_ROWS[task] == len(test.examples)
    # The server matches predictions by index; the files number their rows in order.
    assert test.index.tolist() == list(range(TEST_ROWS[task]))
    spec = get_task(task)
    assert (test.examples.text_b is None) == (len(spec.text_fields) == 1)
    assert all(test.examples.text_a[:50])
    # No labels: placeholders that no metric would mistake for a class.
    assert (np.isnan(test.examples.labels) if spec.is_regression else test.examples.labels == -1).all()


@pytest.mark.parametrize("task", TEST_ROWS)
def test_vendored_test_checksum_matches_sources_md(task: str) -> None:
    spec = get_task(task)
    key = f"{spec.glue_dir}/test.tsv"
    checksum = load_test_split(task).examples.checksum
    assert f"| `{key}` | {TEST_ROWS[task]:,} |" in PACKAGE_SOURCES.read_text()
    assert f"`{checksum}`" in PACKAGE_SOURCES.read_text()
    if SHARED_GLUE.is_dir():
        assert checksum == hashlib.sha256((SHARED_GLUE / key).read_bytes()).hexdigest()


def test_first_test_rows_are_the_glue_ones() -> None:
    assert load_test_split("cola").examples.text_a[0] == "Bill whistled past the house."
    assert load_test_split("stsb").examples.text_a[0] == "A girl is styling her hair."
    assert load_test_split("stsb").examples.text_b[0] == "A girl is brushing her hair."


def test_mnli_has_two_test_splits_read_from_data_dir(tmp_path: Path) -> None:
    assert glue_test_splits(get_task("mnli")) == ("test_matched", "test_mismatched")
    assert glue_test_splits(get_task("rte")) == ("test",)
    (tmp_path / "MNLI").mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\n"
    (tmp_path / "MNLI" / "test_matched.tsv").write_text(header + "0\t1\t1n\tfiction\tA man.\tA person.\n"
                                                        "1\t2\t2n\tfiction\tA dog.\tA cat.\n")
    test = load_test_split("mnli", "test_matched", tmp_path)
    assert test.index.tolist() == [0, 1] and test.examples.text_b == ["A person.", "A cat."]
    with pytest.raises(LorafitError, match="test_mismatched.tsv: file not found"):
        load_test_split("mnli", "test_mismatched", tmp_path)


def test_qqp_test_file_uses_its_id_column(tmp_path: Path) -> None:
    (tmp_path / "QQP").mkdir()
    (tmp_path / "QQP" / "test.tsv").write_text("id\tquestion1\tquestion2\n7\tWhy?\tHow?\n")
    assert load_test_split("qqp", data_dir=tmp_path).index.tolist() == [7]


def test_bad_test_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LorafitError, match="not vendored in lorafit; pass --data-dir"):
        load_test_split("qnli")
    with pytest.raises(LorafitError, match="unknown test split 'test_matched' for task rte"):
        load_test_split("rte", "test_matched")
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tonly one field\n")
    with pytest.raises(LorafitError, match="line 2: expected 3 tab-separated fields, got 2"):
        load_test_split("rte", data_dir=tmp_path)
    (tmp_path / "RTE" / "test.tsv").write_text("idx\tsentence1\tsentence2\n0\ta\tb\n")
    with pytest.raises(LorafitError, match="missing column 'index'"):
        load_test_split("rte", data_dir=tmp_path)
