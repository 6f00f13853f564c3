"""batch_order (determinism, grouping, resume), collate, and evaluation order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafit.data import (
    batch_order,
    collate,
    encode_split,
    eval_batches,
    eval_order,
    iterate_batches,
    load_split,
)


@pytest.fixture(scope="module")
def mrpc_train(tokenizer):
    return encode_split(load_split("mrpc", "train"), tokenizer, 128, cache_dir=None)


def _as_lists(batches: list[np.ndarray]) -> list[list[int]]:
    return [b.tolist() for b in batches]


def _padded_tokens(batches: list[np.ndarray], lengths: np.ndarray) -> int:
    return sum(int(lengths[b].max()) * len(b) for b in batches)


# --------------------------------------------------------------------------------------------
# batch_order


def test_pinned_order() -> None:
    # Pinned so that a change to the algorithm, which would break resuming runs started with
    # an older version, is a deliberate one.
    assert _as_lists(batch_order(10, 3, seed=0, epoch=0)) == [[4, 6, 2], [7, 3, 5], [9, 0, 8], [1]]
    lengths = np.array([5, 1, 9, 3, 3, 7, 2, 8, 4, 6])
    grouped = batch_order(10, 3, seed=0, epoch=0, lengths=lengths, group_by_length=True)
    assert _as_lists(grouped) == [[2, 7, 5], [4, 3, 6], [9, 0, 8], [1]]


def test_deterministic_in_seed_and_epoch() -> None:
    a = _as_lists(batch_order(1000, 32, seed=7, epoch=3))
    np.random.seed(123)  # global numpy state must not matter
    assert _as_lists(batch_order(1000, 32, seed=7, epoch=3)) == a
    assert _as_lists(batch_order(1000, 32, seed=7, epoch=4)) != a
    assert _as_lists(batch_order(1000, 32, seed=8, epoch=3)) != a


def test_every_example_once_and_partial_batch_last() -> None:
    batches = batch_order(103, 10, seed=1, epoch=0)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert all(b.dtype == np.int64 for b in batches)
    dropped = batch_order(103, 10, seed=1, epoch=0, drop_last=True)
    assert _as_lists(dropped) == _as_lists(batches)[:-1]
    assert len(batch_order(100, 10, seed=1, epoch=0, drop_last=True)) == 10
    assert batch_order(0, 10, seed=1, epoch=0) == []


def test_group_by_length_is_a_deterministic_permutation(mrpc_train) -> None:
    kwargs = {"lengths": mrpc_train.lengths, "group_by_length": True}
    batches = batch_order(len(mrpc_train), 16, seed=3, epoch=1, **kwargs)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(mrpc_train)))
    assert [len(b) for b in batches] == [16] * (3668 // 16) + [3668 % 16]
    assert _as_lists(batch_order(len(mrpc_train), 16, seed=3, epoch=1, **kwargs)) == _as_lists(batches)
    assert _as_lists(batch_order(len(mrpc_train), 16, seed=3, epoch=2, **kwargs)) != _as_lists(batches)


def test_group_by_length_reduces_padding_and_keeps_batch_order_random(mrpc_train) -> None:
    lengths = mrpc_train.lengths
    plain = batch_order(len(mrpc_train), 16, seed=3, epoch=0)
    grouped = batch_order(len(mrpc_train), 16, seed=3, epoch=0, lengths=lengths, group_by_length=True)
    useful = int(lengths.sum())
    plain_waste = _padded_tokens(plain, lengths) - useful
    grouped_waste = _padded_tokens(grouped, lengths) - useful
    assert grouped_waste < 0.2 * plain_waste
    # Batches are not simply longest-first: their order is shuffled.
    maxima = [int(lengths[b].max()) for b in grouped[:-1]]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_group_by_length_needs_lengths() -> None:
    with pytest.raises(ValueError, match="lengths"):
        batch_order(10, 2, seed=0, epoch=0, group_by_length=True)
    with pytest.raises(ValueError, match="shape"):
        batch_order(10, 2, seed=0, epoch=0, lengths=np.ones(9), group_by_length=True)
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(10, 0, seed=0, epoch=0)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_skip_equals_uninterrupted_epoch(mrpc_train, tokenizer, group_by_length: bool) -> None:
    kwargs = {"group_by_length": group_by_length, "pad_to_multiple_of": 8}
    full = list(iterate_batches(mrpc_train, 64, 11, 2, tokenizer.pad_token_id, **kwargs))
    resumed = list(iterate_batches(mrpc_train, 64, 11, 2, tokenizer.pad_token_id, start_batch=40, **kwargs))
    assert len(full) == 58 and len(resumed) == 18
    for a, b in zip(full[40:], resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])


# --------------------------------------------------------------------------------------------
# collate


def test_collate_pads_to_longest_and_masks(mrpc_train, tokenizer) -> None:
    indices = np.array([5, 0, 17])
    batch = collate(mrpc_train, indices, tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    width = int(mrpc_train.lengths[indices].max())
    assert (
        batch["input_ids"].shape
        == batch["attention_mask"].shape
        == batch["token_type_ids"].shape
        == (3, width)
    )
    assert (
        batch["input_ids"].dtype
        == batch["attention_mask"].dtype
        == batch["token_type_ids"].dtype
        == torch.int64
    )
    assert batch["labels"].dtype == torch.int64
    for row, i in enumerate(indices):
        example = mrpc_train.example(i)
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"].tolist()
        assert batch["token_type_ids"][row, :n].tolist() == example["token_type_ids"].tolist()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["token_type_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row] == example["label"]


def test_collate_pad_to_multiple_of(mrpc_train) -> None:
    batch = collate(mrpc_train, [0, 1], pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] - int(mrpc_train.lengths[[0, 1]].max()) < 8


def test_collate_regression_labels_are_float(tokenizer) -> None:
    encoded = encode_split(load_split("stsb", "validation"), tokenizer, 64, cache_dir=None)
    batch = collate(encoded, [0, 1], tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([5.0, 4.75])


# --------------------------------------------------------------------------------------------
# Evaluation order


def test_eval_batches_sorted_by_length_and_order_restorable(mrpc_train, tokenizer) -> None:
    batches = list(eval_batches(mrpc_train, 100, tokenizer.pad_token_id))
    assert [len(i) for i, _ in batches] == [100] * 36 + [68]
    maxima = [int(mrpc_train.lengths[i].max()) for i, _ in batches]
    assert maxima == sorted(maxima, reverse=True)
    # The caller's scatter puts results back in file order.
    restored = np.empty(len(mrpc_train), dtype=np.int64)
    for indices, batch in batches:
        restored[indices] = batch["labels"].numpy()
    assert np.array_equal(restored, mrpc_train.labels)


def test_eval_order_is_a_permutation() -> None:
    lengths = np.array([3, 9, 1, 9, 4])
    order = eval_order(lengths, 2)
    assert _as_lists(order) == [[1, 3], [4, 0], [2]]
