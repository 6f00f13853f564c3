"""Parsing delimited text into a :class:`Split`: decoding, TSV rows, labels, and column checks.

Shared by the GLUE files (:mod:`lorafit.data.glue`) and user files (:mod:`lorafit.data.custom`),
so both read a file the same way and report a problem the same way: one
:class:`~lorafit.errors.LorafitError` naming the file, the line where one applies, and what was
expected.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafit.data.tasks import TaskSpec
from lorafit.errors import LorafitError


@dataclass(eq=False)
class Split:
    """The raw examples of one split of one task.

    Attributes:
        task: The task the examples belong to.
        split: Canonical split name: ``"train"`` or one of ``task.eval_splits``.
        text_a: First text of each example.
        text_b: Second text of each example, or ``None`` for single-sentence tasks.
        labels: int64 class ids into ``task.label_names``, or float32 scores for regression.
        source: Where the examples came from, for logs and run metadata.
        checksum: sha256 (hex) of the raw file bytes the split was parsed from; for a hub
            split, of its parsed content. Used as a cache key.
    """

    task: TaskSpec
    split: str
    # Kept out of repr: a split has up to ~400k examples.
    text_a: list[str] = field(repr=False)
    text_b: list[str] | None = field(repr=False)
    labels: np.ndarray = field(repr=False)
    source: str
    checksum: str

    def __len__(self) -> int:
        return len(self.text_a)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, display: str) -> str:
    """Decode UTF-8 (dropping a leading BOM, which MRPC's files have) and reject empty files."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LorafitError(
            f"{display} line {line}: cannot decode byte {data[exc.start : exc.start + 1]!r} as UTF-8; "
            "expected a UTF-8 text file"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise LorafitError(f"{display}: file is empty; expected a header line and data rows")
    return text


def tsv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """Split TSV text into (1-based line number, fields) with quoting off.

    GLUE fields contain bare ``"`` characters (MRPC: ``" the witness "``), so quotes are text,
    never delimiters, exactly like ``csv.QUOTE_NONE``. Fields are not stripped: SST-2 keeps
    the space before its tab.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline; CoLA's dev.tsv has none, which needs no special case
    for number, line in enumerate(lines, start=1):
        # GLUE files have no CRs, but a copy saved on Windows would otherwise carry "\r" into
        # the last field, i.e. the label.
        line = line.removesuffix("\r")
        yield number, line.split("\t")


def empty_label(display: str, line: int, column: str) -> LorafitError:
    """The error for an example without a label (which would otherwise be read as a class named "")."""
    return LorafitError(f"{display} line {line}: column {column!r} is empty; every example needs a label")


class LabelParser:
    """Turns raw label strings into class ids (or float scores), with errors naming the line."""

    def __init__(self, display: str, column: str, raw_labels: Sequence[str] | None) -> None:
        self.display = display
        self.column = column
        self.raw_labels = None if raw_labels is None else tuple(raw_labels)
        self.ids = None if raw_labels is None else {raw: i for i, raw in enumerate(raw_labels)}

    @property
    def dtype(self) -> type:
        return np.float32 if self.ids is None else np.int64

    def __call__(self, raw: str, line: int) -> int | float:
        if not raw.strip():
            raise empty_label(self.display, line, self.column)
        if self.ids is not None:
            label = self.ids.get(raw)
            if label is None:
                allowed = ", ".join(repr(r) for r in self.raw_labels or ())
                raise LorafitError(
                    f"{self.display} line {line}: unknown label {raw!r} in column {self.column!r}; "
                    f"allowed labels: {allowed}"
                )
            return label
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise LorafitError(
                f"{self.display} line {line}: expected a finite number in column {self.column!r}, got {raw!r}"
            )
        return score


def column_indices(display: str, header: Sequence[str], wanted: Sequence[str]) -> list[int]:
    header = list(header)
    indices = []
    for column in wanted:
        if column not in header:
            present = ", ".join(repr(c) for c in header)
            raise LorafitError(f"{display}: missing column {column!r}; columns present: {present}")
        if (count := header.count(column)) > 1:  # which one was meant cannot be known
            raise LorafitError(f"{display}: column {column!r} appears {count} times in the header; rename all but one")
        indices.append(header.index(column))
    return indices


def parse_rows(
    display: str,
    header: Sequence[str],
    rows: Iterable[tuple[int, list[str]]],
    text_columns: Sequence[str],
    label_column: str,
    labels: LabelParser,
    separator: str,
    skip_blank: bool = False,
) -> tuple[list[list[str]], np.ndarray]:
    """Pull text columns and labels out of delimited rows, checking every row's width."""
    *text_idx, label_idx = column_indices(display, header, [*text_columns, label_column])
    width = len(header)
    texts: list[list[str]] = [[] for _ in text_idx]
    values: list[int | float] = []
    for line, fields in rows:
        if skip_blank and (not fields or fields == [""]):
            continue
        if len(fields) != width:
            raise LorafitError(
                f"{display} line {line}: expected {width} {separator}-separated fields, got {len(fields)}"
            )
        for column, idx in zip(texts, text_idx, strict=True):
            column.append(fields[idx])
        values.append(labels(fields[label_idx], line))
    if not values:
        raise LorafitError(f"{display}: no data rows; expected at least one example after the header")
    return texts, np.asarray(values, dtype=labels.dtype)


def make_split(
    task: TaskSpec, split: str, texts: list[list[str]], labels: np.ndarray, source: str, checksum: str
) -> Split:
    return Split(
        task=task,
        split=split,
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        labels=labels,
        source=source,
        checksum=checksum,
    )
