"""GLUE splits: the GLUE TSV layout, the copies vendored in lorafit, and the Hugging Face hub.

Where a split comes from, in order (see :func:`load_split`):

1. ``data_dir``: the GLUE layout written by ``download_glue_data.py``
   (``DIR/SST-2/train.tsv``, ``DIR/MNLI/dev_matched.tsv``...).
2. The gzip-compressed copies shipped in ``lorafit/data/glue`` (SST-2, MRPC, RTE, CoLA, STS-B).
3. The Hugging Face hub (``nyu-mll/glue``), when ``datasets`` is installed and online.

Loading never writes anything.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from lorafit import hub
from lorafit.data.parsing import LabelParser, Split, decode, make_split, parse_rows, sha256, tsv_rows
from lorafit.data.tasks import TaskSpec, get_task
from lorafit.errors import LorafitError

__all__ = ["GLUE_FILES", "VENDORED_TASKS", "load_split"]

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


def _canonical_split(task: TaskSpec, split: str) -> str:
    name = _SPLIT_ALIASES.get(split, split)
    allowed = ("train", *task.eval_splits)
    if name not in allowed:
        raise LorafitError(f"split: unknown split {split!r} for task {task.name}; expected one of {allowed}")
    return name


def _parse_glue(task: TaskSpec, split: str, data: bytes, display: str, source: str) -> Split:
    fmt = _GLUE_FORMATS[task.name]
    rows = tsv_rows(decode(data, display))
    if fmt.columns is not None:
        header: Sequence[str] = fmt.columns
    else:
        _, header = next(rows)
    labels = LabelParser(display, fmt.label_column, fmt.raw_labels)
    texts, label_array = parse_rows(display, header, rows, fmt.text_columns, fmt.label_column, labels, "tab")
    return make_split(task, split, texts, label_array, source, sha256(data))


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
    if not hub.hub_reachable():
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
    return make_split(
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
