"""split_stats and format_stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorafit.data import encode_split, format_stats, get_task, load_split, split_stats


def test_classification_stats(tokenizer) -> None:
    split = load_split("sst2", "validation")
    encoded = encode_split(split, tokenizer, 32, cache_dir=None)
    stats = split_stats(split, encoded)
    json.dumps(stats)  # the CLI may print it as JSON
    assert stats["split"] == "validation" and stats["num_examples"] == 872
    assert stats["checksum"] == split.checksum
    assert stats["labels"]["counts"] == {"negative": 428, "positive": 444}
    assert stats["labels"]["fractions"]["positive"] == pytest.approx(444 / 872)
    tokens = stats["token_lengths"]
    lengths = encoded.lengths
    assert tokens["mean"] == pytest.approx(lengths.mean())
    assert tokens["max"] == 32 == tokens["max_length"]
    assert tokens["at_max_length"] == int((lengths == 32).sum()) > 0
    assert tokens["p50"] <= tokens["p90"] <= tokens["p95"] <= tokens["p99"] <= tokens["max"]
    # p90 is an actual length covering at least 90% of the examples, and no smaller one does.
    assert (lengths <= tokens["p90"]).mean() >= 0.9 > (lengths <= tokens["p90"] - 1).mean()


def test_regression_stats_without_encoding() -> None:
    split = load_split("stsb", "train")
    stats = split_stats(split)
    assert "token_lengths" not in stats
    assert stats["labels"]["mean"] == pytest.approx(2.701, abs=5e-4)
    assert stats["labels"]["min"] == 0.0 and stats["labels"]["max"] == 5.0
    assert stats["labels"]["std"] == pytest.approx(float(np.std(split.labels.astype(np.float64))))


def test_format_stats_table(tokenizer) -> None:
    task = get_task("rte")
    by_split = {}
    for name in ("train", "validation"):
        split = load_split(task, name)
        by_split[name] = split_stats(split, encode_split(split, tokenizer, 128, cache_dir=None))
    text = format_stats(task, by_split)
    assert text.startswith(
        "rte (GLUE RTE): sentence pairs, classification, 2 labels; best-epoch metric: accuracy"
    )
    assert "2,490" in text and "277" in text
    assert "1,249 (50.2%)" in text and "146 (52.7%)" in text
    assert "entailment" in text and "p95" in text and "at max_length" in text
    stsb = format_stats(get_task("stsb"), {"validation": split_stats(load_split("stsb", "validation"))})
    assert "regression" in stsb and "2.364" in stsb and "p95" not in stsb
