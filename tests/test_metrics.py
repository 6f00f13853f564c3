"""compute_metrics against hand-computed values and against scikit-learn/scipy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lorafit.data import TASKS, custom_task, get_task
from lorafit.metrics import compute_metrics, metric_keys, predictions, primary_metric


def _logits_for(preds: list[int], num_labels: int = 2) -> np.ndarray:
    """Logits whose argmax is ``preds``."""
    logits = np.zeros((len(preds), num_labels), dtype=np.float32)
    logits[np.arange(len(preds)), preds] = 1.0
    return logits


def test_binary_metrics_by_hand() -> None:
    gold = np.array([1, 0, 1, 1, 0, 1])
    preds = [1, 0, 0, 1, 1, 1]
    # TP = 3 (rows 0, 3, 5), TN = 1 (row 1), FN = 1 (row 2), FP = 1 (row 4)
    # accuracy = 4/6; precision = recall = 3/4, so F1 = 3/4
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(4*4*2*2) = 2/8
    mrpc = compute_metrics(TASKS["mrpc"], {"validation": (_logits_for(preds), gold)})
    assert mrpc == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(0.75)}
    cola = compute_metrics(TASKS["cola"], {"validation": (_logits_for(preds), gold)})
    assert cola["matthews_correlation"] == pytest.approx(0.25)
    assert cola["accuracy"] == pytest.approx(4 / 6)
    assert all(isinstance(v, float) for v in {**mrpc, **cola}.values())


def test_correlations_by_hand() -> None:
    task = TASKS["stsb"]
    # Pearson of x = [1, 2, 3], y = [1, 2, 4]: deviations [-1, 0, 1] and [-4/3, -1/3, 5/3];
    # covariance sum 3, squares 2 and 14/3, so r = 3 / sqrt(28/3) = sqrt(27/28).
    result = compute_metrics(task, {"validation": (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))})
    assert result["pearson"] == pytest.approx(math.sqrt(27 / 28))
    assert result["spearmanr"] == pytest.approx(1.0)  # same ranks
    # Spearman of x = [1, 2, 3, 4], y = [1, 3, 2, 4]: rank differences [0, -1, 1, 0], so
    # rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8.
    result = compute_metrics(
        task, {"validation": (np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([1.0, 3.0, 2.0, 4.0]))}
    )
    assert result["spearmanr"] == pytest.approx(0.8)
    assert set(result) == {"pearson", "spearmanr"}


def test_regression_outputs_are_never_argmaxed() -> None:
    # With an (N, 1) head, argmax would give all zeros, i.e. a constant and a 0.0 correlation.
    scores = np.array([[0.1], [2.5], [4.9], [3.3]], dtype=np.float32)
    gold = np.array([0.0, 2.0, 5.0, 3.0])
    result = compute_metrics(TASKS["stsb"], {"validation": (scores, gold)})
    assert result["pearson"] == pytest.approx(pearsonr(scores[:, 0], gold).statistic)
    assert result["pearson"] > 0.99
    assert predictions(TASKS["stsb"], scores).tolist() == pytest.approx([0.1, 2.5, 4.9, 3.3])


def test_mnli_combined_accuracy_is_size_weighted() -> None:
    task = TASKS["mnli"]
    matched = (_logits_for([0, 1, 2, 0], 3), np.array([0, 1, 2, 1]))  # 3 of 4
    mismatched = (_logits_for([0, 0], 3), np.array([1, 2]))  # 0 of 2
    result = compute_metrics(task, {"validation_matched": matched, "validation_mismatched": mismatched})
    assert result == {
        "accuracy": pytest.approx(3 / 6),  # not the mean of 0.75 and 0.0
        "accuracy_matched": pytest.approx(0.75),
        "accuracy_mismatched": pytest.approx(0.0),
    }
    assert primary_metric(task) == "accuracy"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_and_scipy_on_random_inputs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 257
    logits = rng.normal(size=(n, 2))
    gold = rng.integers(0, 2, size=n)
    preds = logits.argmax(axis=1)
    qqp = compute_metrics(TASKS["qqp"], {"validation": (logits, gold)})
    assert qqp["accuracy"] == pytest.approx(accuracy_score(gold, preds))
    assert qqp["f1"] == pytest.approx(f1_score(gold, preds))
    cola = compute_metrics(TASKS["cola"], {"validation": (logits, gold)})
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(gold, preds))

    scores, targets = rng.normal(size=n), rng.uniform(0, 5, size=n)
    stsb = compute_metrics(TASKS["stsb"], {"validation": (scores, targets)})
    assert stsb["pearson"] == pytest.approx(pearsonr(scores, targets).statistic)
    assert stsb["spearmanr"] == pytest.approx(spearmanr(scores, targets).statistic)

    logits3 = rng.normal(size=(n, 3))
    gold3 = rng.integers(0, 3, size=n)
    mnli = compute_metrics(
        TASKS["mnli"],
        {"validation_matched": (logits3, gold3), "validation_mismatched": (logits3[:50], gold3[:50])},
    )
    assert mnli["accuracy_matched"] == pytest.approx(accuracy_score(gold3, logits3.argmax(1)))


def test_degenerate_inputs_give_zero_not_nan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy/sklearn warnings either
        cola = compute_metrics(
            TASKS["cola"], {"validation": (_logits_for([1, 1, 1, 1]), np.array([0, 1, 1, 0]))}
        )
        assert cola["matthews_correlation"] == 0.0
        stsb = compute_metrics(
            TASKS["stsb"], {"validation": (np.full(4, 2.5), np.array([0.0, 1.0, 2.0, 3.0]))}
        )
        assert stsb == {"pearson": 0.0, "spearmanr": 0.0}
        constant_gold = compute_metrics(TASKS["stsb"], {"validation": (np.arange(4.0), np.full(4, 3.0))})
        assert constant_gold == {"pearson": 0.0, "spearmanr": 0.0}
        f1 = compute_metrics(TASKS["mrpc"], {"validation": (_logits_for([0, 0]), np.array([0, 0]))})
        assert f1 == {"accuracy": 1.0, "f1": 0.0}


def test_metric_keys_match_results() -> None:
    rng = np.random.default_rng(0)
    for task in TASKS.values():
        outputs = {
            split: (
                rng.normal(size=(8,)) if task.is_regression else rng.normal(size=(8, task.num_labels)),
                rng.normal(size=8) if task.is_regression else rng.integers(0, task.num_labels, size=8),
            )
            for split in task.eval_splits
        }
        result = compute_metrics(task, outputs)
        assert list(result) == metric_keys(task)
        assert primary_metric(task) in result


def test_custom_multiclass_task(tmp_path) -> None:
    task = custom_task(tmp_path / "unused.csv", ["t"], "l", label_names=["a", "b", "c"])
    result = compute_metrics(task, {"validation": (_logits_for([0, 1, 2, 2], 3), np.array([0, 1, 2, 0]))})
    assert result == {"accuracy": pytest.approx(0.75)}


def test_shape_and_split_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        compute_metrics(TASKS["sst2"], {"validation": (np.zeros(3), np.zeros(3, dtype=int))})
    with pytest.raises(ValueError, match="validation_matched"):
        compute_metrics(get_task("mnli"), {"validation": (np.zeros((2, 3)), np.zeros(2, dtype=int))})
    with pytest.raises(ValueError, match="predictions but"):
        compute_metrics(TASKS["sst2"], {"validation": (np.zeros((3, 2)), np.zeros(2, dtype=int))})
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        compute_metrics(TASKS["stsb"], {"validation": (np.zeros((3, 2)), np.zeros(3))})
