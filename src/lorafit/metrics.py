"""GLUE metrics from model outputs, as fractions in [0, 1] like Hugging Face ``evaluate``.

All metric arithmetic is delegated to scikit-learn and scipy; this module only turns logits
into predictions, names the results, and pins down the degenerate cases.
"""

from __future__ import annotations

import math

import numpy as np

from lorafit.data.tasks import TaskSpec

__all__ = ["compute_metrics", "metric_keys", "predictions", "primary_metric"]


def primary_metric(task: TaskSpec) -> str:
    """The key in :func:`compute_metrics`'s result used to pick the best epoch."""
    return task.metric


def _suffix(split: str) -> str:
    # "validation_matched" -> "matched"
    return split.removeprefix("validation_")


def metric_keys(task: TaskSpec) -> list[str]:
    """Every key :func:`compute_metrics` returns for ``task``, in a stable order."""
    keys = list(task.metrics)
    if len(task.eval_splits) > 1:
        keys += [f"{m}_{_suffix(s)}" for s in task.eval_splits for m in task.metrics]
    return keys


def predictions(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) for classification; the raw scores, flattened, for regression."""
    logits = np.asarray(logits)
    if task.is_regression:
        # Never argmax a regression head: with one output column it would always be 0.
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.ndim != 1:
            raise ValueError(f"regression outputs must have shape (N,) or (N, 1), got {logits.shape}")
        return logits.astype(np.float64)
    if logits.ndim != 2 or logits.shape[1] != task.num_labels:
        raise ValueError(
            f"classification logits must have shape (N, {task.num_labels}) for task {task.name}, "
            f"got {logits.shape}"
        )
    return logits.argmax(axis=1)


def _correlation(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction (or constant gold) has no defined correlation; scipy returns NaN
    # with a warning. Reporting 0.0 ("no linear/rank relation learned") keeps best-epoch
    # selection well-defined, since any comparison with NaN is False, and matches what MCC
    # does for the same degenerate case.
    if len(preds) < 2 or np.all(preds == preds[0]) or np.all(labels == labels[0]):
        return 0.0
    return float(fn(preds, labels).statistic)


def _metric(name: str, task: TaskSpec, preds: np.ndarray, labels: np.ndarray) -> float:
    # Imported here, not with the module: scipy.stats and sklearn.metrics take about 1.2 s to
    # import, which every command that imports this module (predict, the parser) would pay.
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if name == "accuracy":
        return float(accuracy_score(labels, preds))
    if name == "f1":
        # F1 of the positive class (id 1: "equivalent", "duplicate"), as GLUE reports it.
        if task.num_labels == 2:
            return float(f1_score(labels, preds, average="binary", pos_label=1, zero_division=0.0))
        return float(f1_score(labels, preds, average="macro", zero_division=0.0))
    if name == "matthews_correlation":
        value = float(matthews_corrcoef(labels, preds))
        # scikit-learn already returns 0.0 when a confusion-matrix marginal is zero (e.g.
        # constant predictions); this guards older versions that returned NaN.
        return 0.0 if math.isnan(value) else value
    if name == "pearson":
        return _correlation(pearsonr, preds, labels)
    if name == "spearmanr":
        return _correlation(spearmanr, preds, labels)
    raise ValueError(f"unknown metric {name!r}")


def compute_metrics(task: TaskSpec, outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Compute every metric of ``task`` from model outputs.

    Args:
        task: The task.
        outputs: For each of ``task.eval_splits``, ``(logits, gold_labels)``: logits of shape
            ``(N, num_labels)`` for classification, ``(N,)`` or ``(N, 1)`` for regression.

    Returns:
        For a single-split task, ``{metric: value}`` for each of ``task.metrics`` (e.g.
        ``accuracy``, ``f1``). For MNLI, also ``accuracy_matched`` and
        ``accuracy_mismatched``; the unsuffixed ``accuracy`` is over both dev sets together
        (size-weighted). Values are floats in [0, 1] (correlations in [-1, 1]).
    """
    if set(outputs) != set(task.eval_splits):
        raise ValueError(
            f"task {task.name}: expected outputs for {list(task.eval_splits)}, got {list(outputs)}"
        )
    per_split: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in task.eval_splits:
        logits, labels = outputs[split]
        preds = predictions(task, logits)
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(preds):
            raise ValueError(f"{split}: {len(preds)} predictions but {len(labels)} labels")
        if len(labels) == 0:
            raise ValueError(f"{split}: no examples")
        per_split[split] = (preds, labels.astype(np.float64) if task.is_regression else labels)

    results: dict[str, float] = {}
    all_preds = np.concatenate([p for p, _ in per_split.values()])
    all_labels = np.concatenate([y for _, y in per_split.values()])
    for name in task.metrics:
        results[name] = _metric(name, task, all_preds, all_labels)
    if len(per_split) > 1:
        for split, (preds, labels) in per_split.items():
            for name in task.metrics:
                results[f"{name}_{_suffix(split)}"] = _metric(name, task, preds, labels)
    return results
