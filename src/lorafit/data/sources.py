"""Loading raw examples: GLUE TSVs, the vendored GLUE copies, the hub, and user files.

Where a split comes from, in order (see :func:`load_split`):

1. ``data_dir``: the GLUE layout written by ``download_glue_data.py``
   (``DIR/SST-2/train.tsv``, ``DIR/MNLI/dev_matched.tsv``...).
2. The gzip-compressed copies shipped in ``lorafit/data/glue`` (SST-2, MRPC, RTE, CoLA, STS-B).
3. The Hugging Face hub (``nyu-mll/glue``), when ``datasets`` is installed and online.

User data (.csv, .tsv, .jsonl with named columns) goes through :func:`load_custom`.

Every problem with a file is reported as one :class:`~lorafit.errors.LorafitError` naming the
file, the line where one applies, and what was expected. Loading never writes anything.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.data.tasks import TaskSpec, get_task
from lorafit.errors import LorafitError

__all__ = ["Split", "load_split", "load_custom", "read_label_values", "VENDORED_TASKS", "GLUE_FILES"]

# File name of each split in the GLUE layout.
GLUE_FILES: dict[str, str] = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}
_SPLIT_ALIASES = {
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}

# Tasks whose train and dev files ship inside the package.
VENDORED_TASKS: tuple[str, ...] = ("sst2", "mrpc", "rte", "cola", "stsb")

_HUB_DATASET = "nyu-mll/glue"


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


# --------------------------------------------------------------------------------------------
# GLUE file formats


@dataclass(frozen=True)
class _GlueFormat:
    """How one task's GLUE TSV maps onto a :class:`Split`.

    ``raw_labels[i]`` is the string the file uses for label id ``i``; ``None`` means the label
    is a float score. ``columns`` names the fields of a file without a header line.
    """

    text_columns: tuple[str, ...]
    label_column: str
    raw_labels: tuple[str, ...] | None
    columns: tuple[str, ...] | None = None


_GLUE_FORMATS: dict[str, _GlueFormat] = {
    "sst2": _GlueFormat(("sentence",), "label", ("0", "1")),
    "mrpc": _GlueFormat(("#1 String", "#2 String"), "Quality", ("0", "1")),
    "rte": _GlueFormat(("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    # CoLA train/dev have no header line.
    "cola": _GlueFormat(
        ("sentence",), "label", ("0", "1"), columns=("source", "label", "original_annotation", "sentence")
    ),
    "stsb": _GlueFormat(("sentence1", "sentence2"), "score", None),
    "qnli": _GlueFormat(("question", "sentence"), "label", ("entailment", "not_entailment")),
    "qqp": _GlueFormat(("question1", "question2"), "is_duplicate", ("0", "1")),
    "mnli": _GlueFormat(("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction")),
}


# --------------------------------------------------------------------------------------------
# Shared parsing helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes, display: str) -> str:
    """Decode UTF-8 (dropping a leading BOM, which MRPC's files have) and reject empty files."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LorafitError(
            f"{display} line {line}: cannot decode byte {data[exc.start : exc.start + 1]!r} as UTF-8; "
            "expected a UTF-8 text file"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise LorafitError(f"{display}: file is empty; expected a header line and data rows")
    return text


def _tsv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
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
        if line.endswith("\r"):
            line = line[:-1]
        yield number, line.split("\t")


class _LabelParser:
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


def _column_indices(display: str, header: Sequence[str], wanted: Sequence[str]) -> list[int]:
    indices = []
    for column in wanted:
        if column not in header:
            present = ", ".join(repr(c) for c in header)
            raise LorafitError(f"{display}: missing column {column!r}; columns present: {present}")
        indices.append(list(header).index(column))
    return indices


def _parse_rows(
    display: str,
    header: Sequence[str],
    rows: Iterable[tuple[int, list[str]]],
    text_columns: Sequence[str],
    label_column: str,
    labels: _LabelParser,
    separator: str,
    skip_blank: bool = False,
) -> tuple[list[list[str]], np.ndarray]:
    """Pull text columns and labels out of delimited rows, checking every row's width."""
    *text_idx, label_idx = _column_indices(display, header, [*text_columns, label_column])
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


def _make_split(
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


# --------------------------------------------------------------------------------------------
# GLUE splits


def _canonical_split(task: TaskSpec, split: str) -> str:
    name = _SPLIT_ALIASES.get(split, split)
    allowed = ("train", *task.eval_splits)
    if name not in allowed:
        raise LorafitError(f"split: unknown split {split!r} for task {task.name}; expected one of {allowed}")
    return name


def _parse_glue(task: TaskSpec, split: str, data: bytes, display: str, source: str) -> Split:
    fmt = _GLUE_FORMATS[task.name]
    rows = _tsv_rows(_decode(data, display))
    if fmt.columns is not None:
        header: Sequence[str] = fmt.columns
    else:
        _, header = next(rows)
    labels = _LabelParser(display, fmt.label_column, fmt.raw_labels)
    texts, label_array = _parse_rows(display, header, rows, fmt.text_columns, fmt.label_column, labels, "tab")
    return _make_split(task, split, texts, label_array, source, _sha256(data))


def _load_glue_dir(task: TaskSpec, split: str, data_dir: Path) -> Split:
    assert task.glue_dir is not None
    if not data_dir.is_dir():
        raise LorafitError(
            f"{data_dir}: --data-dir folder not found; expected a GLUE folder such as "
            f"{data_dir / task.glue_dir / 'train.tsv'}"
        )
    path = data_dir / task.glue_dir / GLUE_FILES[split]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        files = ", ".join(GLUE_FILES[s] for s in ("train", *task.eval_splits))
        raise LorafitError(
            f"{path}: file not found; --data-dir expects the GLUE layout written by "
            f"download_glue_data.py: {data_dir / task.glue_dir}/ with {files}"
        ) from None
    return _parse_glue(task, split, data, str(path), f"GLUE {task.glue_dir} {path.name} from {path}")


def _load_vendored(task: TaskSpec, split: str) -> Split:
    assert task.glue_dir is not None
    name = GLUE_FILES[split]
    resource = resources.files("lorafit.data").joinpath("glue", task.glue_dir, name + ".gz")
    # The checksum is of the decompressed bytes, so it equals the sha256 recorded for the
    # original GLUE file in glue/SOURCES.md (and the cache key does not depend on gzip).
    data = gzip.decompress(resource.read_bytes())
    display = f"lorafit/data/glue/{task.glue_dir}/{name}.gz"
    return _parse_glue(task, split, data, display, f"GLUE {task.glue_dir} {name} (vendored in lorafit)")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _not_available(task: TaskSpec, split: str, reason: str) -> LorafitError:
    return LorafitError(
        f"task {task.name} ({task.glue_dir}), split {split!r}: not vendored in lorafit and the "
        f"Hugging Face hub is unreachable ({reason}). Either pass --data-dir DIR with the GLUE layout "
        f"(DIR/{task.glue_dir}/{GLUE_FILES[split]}), or use your own files with "
        "--train-file/--validation-file"
    )


def _content_checksum(texts: list[list[str]], labels: np.ndarray) -> str:
    # A hub split has no single raw file, so hash what was parsed: it identifies the content
    # as well as a file hash does, independent of the hub's storage format.
    digest = hashlib.sha256()
    for column in texts:
        for text in column:
            digest.update(text.encode("utf-8"))
            digest.update(b"\x1f")
        digest.update(b"\x1e")
    digest.update(str(labels.dtype).encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def _load_from_hub(task: TaskSpec, split: str) -> Split:
    # Offline mode must fail at once instead of waiting on network timeouts.
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(flag):
            raise _not_available(task, split, f"{flag} is set")
    try:
        import datasets
    except ImportError:
        raise _not_available(
            task, split, "the 'datasets' package is not installed; pip install 'lorafit[hub]'"
        ) from None
    # Without the offline flags, a machine with no network would otherwise sit through the
    # hub client's retries (about half a minute) before failing.
    from lorafit.models import hub_reachable

    if not hub_reachable():
        raise _not_available(task, split, "no connection to the hub")
    try:
        dataset = datasets.load_dataset(_HUB_DATASET, task.name, split=split)
    except Exception as exc:  # offline, DNS, HTTP errors, missing config: all mean "not there"
        message = " ".join(str(exc).split())[:200]
        raise _not_available(task, split, f"{type(exc).__name__}: {message}") from exc
    texts = [list(dataset[field]) for field in task.text_fields]
    dtype = np.float32 if task.is_regression else np.int64
    labels = np.asarray(dataset["label"], dtype=dtype)
    if not task.is_regression and labels.size and (labels.min() < 0 or labels.max() >= task.num_labels):
        raise LorafitError(
            f"{_HUB_DATASET}/{task.name} split {split!r}: labels outside 0..{task.num_labels - 1} "
            "(unlabeled test split?)"
        )
    return _make_split(
        task,
        split,
        texts,
        labels,
        f"Hugging Face hub {_HUB_DATASET}/{task.name}",
        _content_checksum(texts, labels),
    )


def load_split(task: TaskSpec | str, split: str, data_dir: str | Path | None = None) -> Split:
    """Load one split of a GLUE task.

    Args:
        task: A :class:`TaskSpec` or any spelling :func:`get_task` accepts.
        split: ``"train"`` or one of ``task.eval_splits``; ``"dev"``, ``"dev_matched"`` and
            ``"dev_mismatched"`` are accepted as aliases.
        data_dir: A folder in the GLUE layout; when given it is the only place looked at.

    Returns:
        The parsed split, with ``split.split`` the canonical split name.

    Raises:
        LorafitError: for a missing or malformed file, an unknown split, or a task that is
            neither vendored nor reachable on the hub.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if spec.glue_dir is None or spec.name not in _GLUE_FORMATS:
        raise LorafitError(f"task {spec.name}: not a GLUE task; load its files with load_custom")
    split = _canonical_split(spec, split)
    if data_dir is not None:
        return _load_glue_dir(spec, split, Path(data_dir))
    if spec.name in VENDORED_TASKS and split in ("train", "validation"):
        return _load_vendored(spec, split)
    return _load_from_hub(spec, split)


# --------------------------------------------------------------------------------------------
# User files


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
    rows = _tsv_rows(text) if kind == "tsv" else _csv_rows(text, display)
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
    text: str, display: str, text_columns: Sequence[str], label_column: str, labels: _LabelParser
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
    text = _decode(_read_file(path), display)
    if kind == "jsonl":
        return [
            _json_label_text(_jsonl_field(display, line, record, label_column))
            for line, record in _jsonl_records(text, display)
        ]
    header, rows = _delimited_table(kind, text, display)
    (label_idx,) = _column_indices(display, header, [label_column])
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
        values.append(fields[label_idx])
    return values


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
    text = _decode(data, display)
    labels = _LabelParser(display, label_column, task.label_names)
    if kind == "jsonl":
        texts, label_array = _parse_jsonl(text, display, text_columns, label_column, labels)
    else:
        header, rows = _delimited_table(kind, text, display)
        separator = "tab" if kind == "tsv" else "comma"
        texts, label_array = _parse_rows(
            display, header, rows, text_columns, label_column, labels, separator, skip_blank=True
        )
    return _make_split(task, split, texts, label_array, f"custom file {path}", _sha256(data))
