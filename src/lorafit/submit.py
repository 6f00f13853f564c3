"""GLUE test-set predictions in the GLUE server's format, and the submission zip.

The server (gluebenchmark.com) takes one zip with a ``<NAME>.tsv`` per task at its top level,
each a header ``index<TAB>prediction`` and one row per test example in the test file's order:
the label string GLUE uses for the class (``0``/``1`` for CoLA, SST-2, MRPC, QQP;
``entailment``/``not_entailment`` for RTE and QNLI; MNLI's three names) or, for STS-B, a score
clipped to [0, 5]. The server expects all eleven files (the nine tasks, MNLI twice, and the
AX diagnostic, which takes MNLI predictions); ``lorafit submit`` says which ones are missing.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.data import TaskSpec, encode_split
from lorafit.data.unlabeled import glue_test_splits, load_test_split
from lorafit.errors import LorafitError
from lorafit.io import atomic_write_bytes

__all__ = [
    "ALL_SUBMISSION_FILES",
    "SERVER_LABELS",
    "SUBMISSION_FILES",
    "build_submission",
    "format_predictions",
    "predict_test",
    "write_test_predictions",
]

# (task, test split) -> file name in the submission zip.
SUBMISSION_FILES: dict[tuple[str, str], str] = {
    ("cola", "test"): "CoLA.tsv",
    ("sst2", "test"): "SST-2.tsv",
    ("mrpc", "test"): "MRPC.tsv",
    ("stsb", "test"): "STS-B.tsv",
    ("qqp", "test"): "QQP.tsv",
    ("mnli", "test_matched"): "MNLI-m.tsv",
    ("mnli", "test_mismatched"): "MNLI-mm.tsv",
    ("qnli", "test"): "QNLI.tsv",
    ("rte", "test"): "RTE.tsv",
}
# Every file the GLUE server's zip holds; WNLI and AX are not tasks lorafit trains.
ALL_SUBMISSION_FILES: tuple[str, ...] = (*SUBMISSION_FILES.values(), "WNLI.tsv", "AX.tsv")
# The prediction strings the server expects, in label-id order (the order of TaskSpec.label_names).
SERVER_LABELS: dict[str, tuple[str, ...]] = {
    "cola": ("0", "1"),
    "sst2": ("0", "1"),
    "mrpc": ("0", "1"),
    "qqp": ("0", "1"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
}
STSB_RANGE = (0.0, 5.0)


@dataclass
class Predictions:
    """One submission file's content."""

    filename: str
    index: np.ndarray
    values: list[str]

    def to_tsv(self) -> bytes:
        rows = "".join(f"{i}\t{v}\n" for i, v in zip(self.index.tolist(), self.values, strict=True))
        return ("index\tprediction\n" + rows).encode("utf-8")


def _glue_task(task: TaskSpec | None, where: str) -> TaskSpec:
    if task is None or task.glue_dir is None or not any(t == task.name for t, _ in SUBMISSION_FILES):
        name = "no task" if task is None else f"task {task.name!r}"
        raise LorafitError(f"{where}: trained on {name}, not a GLUE task; only GLUE tasks have test "
                           "splits to submit")
    return task


def format_predictions(task: TaskSpec, logits: np.ndarray) -> list[str]:
    """Model outputs (examples x labels) as the strings the GLUE server expects."""
    if task.is_regression:
        scores = np.clip(logits[:, 0], *STSB_RANGE)
        return [f"{s:.3f}" for s in scores.tolist()]
    labels = SERVER_LABELS[task.name]
    if logits.shape[1] != len(labels):
        raise LorafitError(f"task {task.name}: the model has {logits.shape[1]} outputs, GLUE has "
                           f"{len(labels)} labels")
    return [labels[i] for i in logits.argmax(axis=1).tolist()]


def predict_test(trained, data_dir: str | Path | None = None, batch_size: int = 64,
                 where: str = "model") -> list[Predictions]:
    """Predict every test split of the task ``trained`` was trained on.

    Args:
        trained: A :class:`lorafit.inference.Trained` (from ``load_trained``).
        data_dir: GLUE-layout folder for tasks whose test files are not vendored (MNLI, QNLI, QQP).
        batch_size: Examples per forward pass.
        where: How to name the model in errors (its path).
    """
    from lorafit.evaluation import predict_logits

    task = _glue_task(trained.task, where)
    pad = trained.tokenizer.pad_token_id or 0
    out = []
    for split in glue_test_splits(task):
        test = load_test_split(task, split, data_dir)
        data = encode_split(test.examples, trained.tokenizer, trained.max_length)
        logits = predict_logits(trained.model, data, batch_size, pad, trained.autocast)
        out.append(Predictions(SUBMISSION_FILES[(task.name, split)], test.index, format_predictions(task, logits)))
    return out


def write_test_predictions(path: str | Path, output: str | Path, data_dir: str | Path | None = None,
                           batch_size: int = 64, overwrite: bool = False, precision: str = "trained",
                           device: str = "cpu") -> list[Path]:
    """``lorafit predict RUN --split test --output DIR``: the task's submission file(s) in DIR."""
    from lorafit.inference import load_trained

    trained = load_trained(path, precision=precision, device=device)
    task = _glue_task(trained.task, str(path))
    output = Path(output)
    targets = [output / SUBMISSION_FILES[(task.name, s)] for s in glue_test_splits(task)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise LorafitError(f"--output {output}: {', '.join(existing)} exists; pass --overwrite to replace it")
    written = []
    for predictions in predict_test(trained, data_dir, batch_size, str(path)):
        atomic_write_bytes(output / predictions.filename, predictions.to_tsv())
        written.append(output / predictions.filename)
    return written


def build_submission(paths: list[str | Path], output: str | Path, data_dir: str | Path | None = None,
                     batch_size: int = 64, overwrite: bool = False, precision: str = "trained",
                     device: str = "cpu") -> tuple[list[str], list[str]]:
    """Predict the test set(s) of each trained model and zip them as the GLUE server takes them,
    each in ``precision`` (:func:`lorafit.inference.inference_precision`) on ``device``.

    Returns:
        The file names in the zip, and the names of the server's files that are missing.

    Raises:
        LorafitError: for an existing zip (without ``overwrite``), a non-GLUE model, or two
            models of the same task. Nothing is written then.
    """
    from lorafit.inference import load_trained

    output = Path(output)
    if output.suffix != ".zip":
        raise LorafitError(f"--output {output}: expected a .zip file name")
    if output.exists() and not overwrite:
        raise LorafitError(f"--output {output}: exists; pass --overwrite to replace it")
    files: dict[str, bytes] = {}
    owner: dict[str, str] = {}
    for path in paths:
        trained = load_trained(path, precision=precision, device=device)
        task = _glue_task(trained.task, str(path))
        if task.name in owner:
            raise LorafitError(f"submit: {owner[task.name]} and {path} are both {task.name} models; "
                               "give one run per task")
        owner[task.name] = str(path)
        for predictions in predict_test(trained, data_dir, batch_size, str(path)):
            files[predictions.filename] = predictions.to_tsv()
    buffer = _zip(files)
    atomic_write_bytes(output, buffer)
    names = [n for n in ALL_SUBMISSION_FILES if n in files]
    return names, [n for n in ALL_SUBMISSION_FILES if n not in files]


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in ALL_SUBMISSION_FILES:  # the server's order, so equal inputs give equal zips
            if name in files:
                # A fixed timestamp keeps the zip's bytes a function of the predictions alone.
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, files[name])
    return buffer.getvalue()


# -- command line -----------------------------------------------------------------------------


def run_submit_cli(args: argparse.Namespace) -> int:
    names, missing = build_submission(args.paths, args.output, args.data_dir, args.batch_size, args.overwrite,
                                      args.precision, args.device)
    print(f"{args.output}: {', '.join(names)}")
    if missing:
        print(f"missing (the GLUE server expects all {len(ALL_SUBMISSION_FILES)} files): {', '.join(missing)}")
    return 0
