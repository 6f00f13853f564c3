"""Batch order and collation.

The order of an epoch's batches is a pure function of ``(seed, epoch)`` and the data, so a run
resumed mid-epoch can rebuild the same order and skip the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lorafit.data.tokenization import Encoded

__all__ = ["MEGABATCH_FACTOR", "batch_order", "collate", "eval_batches", "eval_order", "iterate_batches"]

# Length grouping sorts within windows of this many batches: large enough that batches have
# similar lengths, small enough that each window is still a random sample of the data.
# 50 is what Hugging Face's LengthGroupedSampler uses.
MEGABATCH_FACTOR = 50


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def batch_order(
    num_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    lengths: np.ndarray | None = None,
    group_by_length: bool = False,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """The batches of one training epoch, as arrays of example indices.

    The examples are shuffled with ``numpy.random.default_rng([seed, epoch])``. With
    ``group_by_length`` the shuffled indices are cut into windows of
    ``MEGABATCH_FACTOR * batch_size``, each window is sorted by length (longest first) and cut
    into batches, and the full batches are shuffled again, so each batch holds examples of
    similar length (less padding) while the order of batches stays random.

    The last batch may be smaller than ``batch_size``; it is always last (so every other step
    sees a full batch), and is dropped when ``drop_last``.

    Args:
        num_examples: Number of examples in the split.
        batch_size: Examples per batch.
        seed: The run's seed (non-negative).
        epoch: The epoch number (non-negative); each epoch gets its own order.
        lengths: Token count of each example; required with ``group_by_length``.
        group_by_length: Put examples of similar length in the same batch.
        drop_last: Drop the final partial batch.

    Returns:
        int64 index arrays, one per batch, in training order.
    """
    _check_positive("batch_size", batch_size)
    if num_examples < 0 or seed < 0 or epoch < 0:
        raise ValueError(
            f"num_examples, seed and epoch must be non-negative, got {num_examples}, {seed}, {epoch}"
        )
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(num_examples).astype(np.int64)

    if group_by_length:
        if lengths is None:
            raise ValueError("group_by_length needs lengths")
        lengths = np.asarray(lengths)
        if lengths.shape != (num_examples,):
            raise ValueError(f"lengths has shape {lengths.shape}, expected ({num_examples},)")
        window = MEGABATCH_FACTOR * batch_size
        parts = []
        for start in range(0, num_examples, window):
            chunk = order[start : start + window]
            # Stable sort, so ties keep the shuffled order and the result stays a pure
            # function of the arguments.
            parts.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
        order = np.concatenate(parts) if parts else order

    num_full = num_examples // batch_size
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(num_full)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(num_full)]
    if num_examples % batch_size and not drop_last:
        batches.append(order[num_full * batch_size :])
    return batches


def collate(
    encoded: Encoded,
    indices: np.ndarray | list[int],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad the examples ``indices`` to the longest of them and stack them into tensors.

    Args:
        encoded: The tokenized split.
        indices: Which examples, in batch order.
        pad_token_id: The tokenizer's pad token id.
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for
            tensor cores).

    Returns:
        ``input_ids`` and ``attention_mask`` (int64, shape ``(B, L)``), ``token_type_ids``
        (int64, padded with 0) when the encoding has them, and ``labels`` (int64 for
        classification, float32 for regression, shape ``(B,)``).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError("indices must be a non-empty 1-D sequence")
    lengths = encoded.lengths[indices]
    width = int(lengths.max())
    if pad_to_multiple_of:
        _check_positive("pad_to_multiple_of", pad_to_multiple_of)
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = np.full((len(indices), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(indices), width), dtype=np.int64)
    token_type_ids = None if encoded.token_type_ids is None else np.zeros_like(attention_mask)
    for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
        start = encoded.offsets[i]
        input_ids[row, :n] = encoded.input_ids[start : start + n]
        attention_mask[row, :n] = 1
        if token_type_ids is not None:
            token_type_ids[row, :n] = encoded.token_type_ids[start : start + n]

    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if token_type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(token_type_ids)
    label_dtype = np.float32 if encoded.is_regression else np.int64
    batch["labels"] = torch.from_numpy(np.ascontiguousarray(encoded.labels[indices], dtype=label_dtype))
    return batch


def iterate_batches(
    encoded: Encoded,
    batch_size: int,
    seed: int,
    epoch: int,
    pad_token_id: int,
    *,
    group_by_length: bool = False,
    drop_last: bool = False,
    pad_to_multiple_of: int | None = None,
    start_batch: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated training batches of one epoch, starting at batch ``start_batch``.

    Resuming with ``start_batch=k`` yields exactly the batches an uninterrupted epoch would
    have yielded after its first ``k``. The number of batches in the epoch is
    ``len(batch_order(...))``.
    """
    order = batch_order(
        len(encoded),
        batch_size,
        seed,
        epoch,
        encoded.lengths,
        group_by_length=group_by_length,
        drop_last=drop_last,
    )
    for indices in order[start_batch:]:
        yield collate(encoded, indices, pad_token_id, pad_to_multiple_of)


def eval_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches with examples sorted by length (longest first), to minimize padding.

    Concatenating the batches gives a permutation ``perm`` of the examples; put results back
    in file order with ``out[perm] = results``.
    """
    _check_positive("batch_size", batch_size)
    order = np.argsort(-np.asarray(lengths), kind="stable").astype(np.int64)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eval_batches(
    encoded: Encoded,
    batch_size: int,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield ``(indices, batch)`` for evaluation, longest examples first.

    ``indices`` are the example positions in the batch, so the caller restores file order
    with ``logits_all[indices] = batch_logits``.
    """
    for indices in eval_order(encoded.lengths, batch_size):
        yield indices, collate(encoded, indices, pad_token_id, pad_to_multiple_of)
