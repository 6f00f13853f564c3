"""GLUE test splits: unlabeled examples, each with the ``index`` the GLUE server matches
predictions by.

The test files of SST-2, MRPC, RTE, CoLA and STS-B ship gzip-compressed in
``lorafit/data/glue`` (see its SOURCES.md); the other tasks' come from ``--data-dir`` in the GLUE
layout (``DIR/MNLI/test_matched.tsv``, ``DIR/QQP/test.tsv``...). A test split is returned as a
:class:`~lorafit.data.sources.Split` whose labels are placeholders (-1, or NaN for STS-B), so it
goes through the same tokenization and batching as a dev split.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lorafit.data.parsing import Split
from lorafit.data.tasks import TaskSpec, get_task
from lorafit.errors import LorafitError

__all__ = ["TEST_FILES", "GlueTestSplit", "glue_test_splits", "load_test_split"]

# File name of each test split in the GLUE layout (MNLI has two).
TEST_FILES: dict[str, str] = {
    "test": "test.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}
# The index column and text columns of each task's test file (QQP calls its index "id").
_TEST_COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("index", ("sentence",)),
    "mrpc": ("index", ("#1 String", "#2 String")),
    "rte": ("index", ("sentence1", "sentence2")),
    "cola": ("index", ("sentence",)),
    "stsb": ("index", ("sentence1", "sentence2")),
    "qnli": ("index", ("question", "sentence")),
    "qqp": ("id", ("question1", "question2")),
    "mnli": ("index", ("sentence1", "sentence2")),
}
_VENDORED = ("sst2", "mrpc", "rte", "cola", "stsb")


@dataclass(eq=False)
class GlueTestSplit:
    """One GLUE test split: the examples (placeholder labels) and their server indices."""

    examples: Split
    index: np.ndarray  # int64, the file's index column, in file order

    def __len__(self) -> int:
        return len(self.index)


def glue_test_splits(task: TaskSpec) -> tuple[str, ...]:
    """The test split names of a task: ``("test",)``, or MNLI's matched and mismatched."""
    return tuple(s.replace("validation", "test") for s in task.eval_splits)


def _read(task: TaskSpec, split: str, data_dir: str | Path | None) -> tuple[bytes, str]:
    assert task.glue_dir is not None
    name = TEST_FILES[split]
    if data_dir is not None:
        path = Path(data_dir) / task.glue_dir / name
        try:
            return path.read_bytes(), str(path)
        except FileNotFoundError:
            raise LorafitError(
                f"{path}: file not found; --data-dir expects the GLUE layout with the test file "
                f"{task.glue_dir}/{name}"
            ) from None
    if task.name not in _VENDORED:
        raise LorafitError(
            f"task {task.name} ({task.glue_dir}): its test split is not vendored in lorafit; pass "
            f"--data-dir DIR with the GLUE layout (DIR/{task.glue_dir}/{name})"
        )
    resource = resources.files("lorafit.data").joinpath("glue", task.glue_dir, name + ".gz")
    return gzip.decompress(resource.read_bytes()), f"lorafit/data/glue/{task.glue_dir}/{name}.gz"


def load_test_split(task: TaskSpec | str, split: str = "test", data_dir: str | Path | None = None) -> GlueTestSplit:
    """Load one unlabeled GLUE test split, vendored or from ``data_dir``.

    Args:
        task: A GLUE :class:`TaskSpec` or any spelling :func:`get_task` accepts.
        split: ``"test"``, or ``"test_matched"``/``"test_mismatched"`` for MNLI.
        data_dir: A folder in the GLUE layout; when given it is the only place looked at.

    Raises:
        LorafitError: for a custom task, an unknown split, or a missing or malformed file.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if spec.glue_dir is None or spec.name not in _TEST_COLUMNS:
        raise LorafitError(f"task {spec.name}: not a GLUE task, so it has no GLUE test split")
    if split not in glue_test_splits(spec):
        raise LorafitError(f"split: unknown test split {split!r} for task {spec.name}; "
                           f"expected one of {glue_test_splits(spec)}")
    data, display = _read(spec, split, data_dir)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LorafitError(f"{display}: not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise LorafitError(f"{display}: file is empty; expected a header line and data rows")
    # Quotes are text in GLUE files (csv.QUOTE_NONE), so a plain split on tabs is exact.
    header = lines[0].rstrip("\r").split("\t")
    index_column, text_columns = _TEST_COLUMNS[spec.name]
    missing = [c for c in (index_column, *text_columns) if c not in header]
    if missing:
        raise LorafitError(f"{display}: missing column {missing[0]!r}; columns present: {', '.join(header)}")
    positions = [header.index(c) for c in text_columns]
    index, texts = [], [[] for _ in text_columns]
    for number, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != len(header):
            raise LorafitError(f"{display} line {number}: expected {len(header)} tab-separated fields, "
                               f"got {len(fields)}")
        try:
            index.append(int(fields[header.index(index_column)]))
        except ValueError:
            raise LorafitError(f"{display} line {number}: column {index_column!r} must be an integer, "
                               f"got {fields[header.index(index_column)]!r}") from None
        for column, position in zip(texts, positions, strict=True):
            column.append(fields[position])
    if not index:
        raise LorafitError(f"{display}: no data rows; expected at least one example after the header")
    labels = np.full(len(index), np.nan, np.float32) if spec.is_regression else np.full(len(index), -1, np.int64)
    examples = Split(
        task=spec, split=split, text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None, labels=labels,
        source=f"GLUE {spec.glue_dir} {TEST_FILES[split]} ({display})",
        checksum=hashlib.sha256(data).hexdigest(),
    )
    return GlueTestSplit(examples, np.asarray(index, dtype=np.int64))
