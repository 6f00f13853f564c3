"""User data files (.csv, .tsv, .jsonl with named columns) and the task they define.

CSV files use standard CSV quoting; TSV files are read like GLUE's, with quotes as plain text;
JSONL files hold one object per line. :func:`read_table` is the reader of record for delimited
user files, also for ``lorafit predict --input``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.data.parsing import (
    LabelParser,
    Split,
    column_indices,
    decode,
    empty_label,
    make_split,
    parse_rows,
    sha256,
    tsv_rows,
)
from lorafit.data.tasks import TaskSpec
from lorafit.errors import LorafitError

__all__ = ["custom_task", "load_custom", "read_label_values", "read_table"]

def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LorafitError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a folder; expected a .csv, .tsv or .jsonl file") from None


def _file_kind(path: Path) -> str:
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("csv", "tsv", "jsonl"):
        raise LorafitError(f"{path}: unsupported file type {path.suffix!r}; expected .csv, .tsv or .jsonl")
    return kind


def _csv_rows(text: str, display: str) -> Iterator[tuple[int, list[str]]]:
    """Rows of a CSV file with standard quoting, numbered by the line each record starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise LorafitError(f"{display} line {start}: malformed CSV ({exc})") from None
        yield start, fields
        start = reader.line_num + 1


def _delimited_table(kind: str, text: str, display: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    # User TSVs are read like GLUE's (quotes are text); CSVs use standard CSV quoting, which is
    # what spreadsheet and pandas exports rely on.
    rows = tsv_rows(text) if kind == "tsv" else _csv_rows(text, display)
    for _, header in rows:
        if header and header != [""]:
            return header, rows
    raise LorafitError(f"{display}: file is empty; expected a header line and data rows")


def _jsonl_records(text: str, display: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorafitError(
                f"{display} line {line_number}: invalid JSON ({exc.msg}); expected one object per line"
            ) from None
        if not isinstance(record, dict):
            raise LorafitError(
                f"{display} line {line_number}: expected a JSON object, got {type(record).__name__}"
            )
        yield line_number, record


def _json_label_text(value: Any) -> str:
    # Labels are matched as strings; JSON numbers and booleans get their JSON spelling so
    # that 1 and "1" name the same class.
    return value if isinstance(value, str) else json.dumps(value)


def _jsonl_field(display: str, line: int, record: dict[str, Any], column: str) -> Any:
    if column not in record:
        present = ", ".join(repr(k) for k in record)
        raise LorafitError(f"{display} line {line}: missing column {column!r}; columns present: {present}")
    return record[column]


def _parse_jsonl(
    text: str, display: str, text_columns: Sequence[str], label_column: str, labels: LabelParser
) -> tuple[list[list[str]], np.ndarray]:
    texts: list[list[str]] = [[] for _ in text_columns]
    values: list[int | float] = []
    for line, record in _jsonl_records(text, display):
        for column, name in zip(texts, text_columns, strict=True):
            value = _jsonl_field(display, line, record, name)
            if not isinstance(value, str):
                raise LorafitError(
                    f"{display} line {line}: column {name!r}: expected a string, got {type(value).__name__}"
                )
            column.append(value)
        raw = _jsonl_field(display, line, record, label_column)
        if raw is None or isinstance(raw, (list, dict)) or (labels.ids is None and isinstance(raw, bool)):
            raise LorafitError(
                f"{display} line {line}: column {label_column!r}: expected a label value, "
                f"got {json.dumps(raw)}"
            )
        values.append(labels(_json_label_text(raw), line))
    if not values:
        raise LorafitError(f"{display}: no data rows; expected one JSON object per line")
    return texts, np.asarray(values, dtype=labels.dtype)


def read_label_values(path: str | Path, label_column: str) -> list[str]:
    """The raw label strings of a user file, one per example, in file order.

    Used by :func:`~lorafit.data.tasks.custom_task` to infer the label names.

    Raises:
        LorafitError: for a missing, empty, undecodable or malformed file, or a missing column.
    """
    path = Path(path)
    kind = _file_kind(path)
    display = str(path)
    text = decode(_read_file(path), display)
    if kind == "jsonl":
        values = [
            (line, _json_label_text(_jsonl_field(display, line, record, label_column)))
            for line, record in _jsonl_records(text, display)
        ]
    else:
        header, rows = _delimited_table(kind, text, display)
        (label_idx,) = column_indices(display, header, [label_column])
        values = []
        for line, fields in rows:
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                separator = "tab" if kind == "tsv" else "comma"
                raise LorafitError(
                    f"{display} line {line}: expected {len(header)} {separator}-separated fields, "
                    f"got {len(fields)}"
                )
            values.append((line, fields[label_idx]))
    for line, value in values:
        if not value.strip():
            raise empty_label(display, line, label_column)
    return [value for _, value in values]


def load_custom(
    path: str | Path,
    text_columns: Sequence[str],
    label_column: str,
    task: TaskSpec,
    *,
    split: str = "train",
) -> Split:
    """Load a user file (.csv, .tsv or .jsonl) with named columns.

    CSV files use standard CSV quoting; TSV files are read like GLUE's, with quotes as plain
    text; JSONL files hold one object per line. Blank lines are skipped. Classification
    labels must be one of ``task.label_names`` (JSON numbers match their JSON spelling, so
    ``1`` matches ``"1"``); regression labels are parsed as floats.

    Args:
        path: The file to read.
        text_columns: One or two text column names, in order.
        label_column: The label column name.
        task: The task the labels belong to, typically from :func:`custom_task`.
        split: The split name to record, ``"train"`` or ``"validation"``.

    Raises:
        LorafitError: for any problem with the file, naming the file and line.
    """
    path = Path(path)
    kind = _file_kind(path)
    if len(text_columns) != len(task.text_fields):
        raise LorafitError(
            f"text columns: task {task.name} has {len(task.text_fields)} text field(s), "
            f"got {len(text_columns)} column name(s)"
        )
    display = str(path)
    data = _read_file(path)
    text = decode(data, display)
    labels = LabelParser(display, label_column, task.label_names)
    if kind == "jsonl":
        texts, label_array = _parse_jsonl(text, display, text_columns, label_column, labels)
    else:
        header, rows = _delimited_table(kind, text, display)
        separator = "tab" if kind == "tsv" else "comma"
        texts, label_array = parse_rows(
            display, header, rows, text_columns, label_column, labels, separator, skip_blank=True
        )
    return make_split(task, split, texts, label_array, f"custom file {path}", sha256(data))


def _sort_labels(values: set[str]) -> tuple[str, ...]:
    # Integer labels sort numerically so "10" comes after "9"; anything else sorts as text.
    try:
        return tuple(sorted(values, key=int))
    except ValueError:
        return tuple(sorted(values))


def custom_task(
    train_file: str | Path,
    text_columns: Sequence[str],
    label_column: str,
    *,
    name: str = "custom",
    regression: bool = False,
    label_names: Sequence[str] | None = None,
) -> TaskSpec:
    """Build a :class:`TaskSpec` for user data (``--train-file``/``--validation-file``).

    For classification the label names are the sorted distinct values of ``label_column`` in
    ``train_file`` (numerically sorted when they are all integers), unless ``label_names`` is
    given. The label id of a value is its position in that tuple.

    Args:
        train_file: The training file (.csv, .tsv or .jsonl) to infer label names from.
        text_columns: One or two text column names.
        label_column: The label column name.
        name: Task name shown in logs and run metadata.
        regression: Treat the label as a real-valued score instead of a class.
        label_names: Explicit class names in label-id order; skips reading ``train_file``.

    Raises:
        LorafitError: for a bad file, a missing column, or fewer than two distinct labels.
    """
    text_fields = tuple(text_columns)
    if len(text_fields) not in (1, 2):
        raise LorafitError(f"text columns: expected 1 or 2 column names, got {len(text_fields)}")
    if regression:
        return TaskSpec(name, None, text_fields, None, "pearson", ("pearson", "spearmanr"))

    if label_names is None:
        label_names = _sort_labels(set(read_label_values(train_file, label_column)))
    names = tuple(label_names)
    if len(names) < 2:
        raise LorafitError(
            f"{train_file}: column {label_column!r} has {len(names)} distinct label value(s) "
            f"{list(names)!r}; classification needs at least 2 (use regression for scores)"
        )
    if len(set(names)) != len(names):
        raise LorafitError(f"label names: expected distinct names, got {list(names)!r}")
    # F1 of class id 1 is only meaningful for two classes.
    metrics = ("accuracy", "f1") if len(names) == 2 else ("accuracy",)
    return TaskSpec(name, None, text_fields, names, "accuracy", metrics)


def read_table(path: str | Path, display: str | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, fields) rows of a user's .csv or .tsv file.

    Read as :func:`load_custom` reads them (CSV quoting for .csv; quotes are text in .tsv), with
    every row checked to have the header's width and blank lines skipped.
    """
    path = Path(path)
    display = display or str(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("csv", "tsv"):
        raise LorafitError(f"{display}: unsupported file type {path.suffix!r}; expected .csv or .tsv")
    header, rows = _delimited_table(kind, decode(_read_file(path), display), display)
    separator = "tab" if kind == "tsv" else "comma"
    body = []
    for line, fields in rows:
        if not fields or fields == [""]:
            continue
        if len(fields) != len(header):
            raise LorafitError(
                f"{display} line {line}: expected {len(header)} {separator}-separated fields, got {len(fields)}")
        body.append((line, fields))
    return header, body
