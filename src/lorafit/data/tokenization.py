"""Tokenizing a split once, compactly, with an on-disk cache.

Token ids of all examples are stored flat (one int32 array plus offsets) instead of one
Python list per example: full MNLI is ~15M tokens, which is 60 MB this way and gigabytes as
Python ints. The cache is one safetensors file per (tokenizer, max_length, file content, split,
label mapping), so changing any of them re-tokenizes and nothing stale is ever read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.data.parsing import Split
from lorafit.errors import LorafitError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "USE_DEFAULT_CACHE",
    "Encoded",
    "cache_key",
    "default_cache_dir",
    "encode_split",
]

# Bump when the layout of cached files or the way they are computed changes.
CACHE_FORMAT_VERSION = 1

# Examples per tokenizer call: large enough for the fast tokenizer's batching to pay off,
# small enough that the intermediate Python lists stay modest on QQP/MNLI.
_CHUNK = 4096


class _UseDefaultCache:
    def __repr__(self) -> str:
        return "USE_DEFAULT_CACHE"


#: Pass as ``cache_dir`` to use :func:`default_cache_dir` (the default of :func:`encode_split`).
USE_DEFAULT_CACHE: Any = _UseDefaultCache()


def default_cache_dir() -> Path:
    """``$LORAFIT_CACHE`` if set, else ``~/.cache/lorafit/tokenized``."""
    env = os.environ.get("LORAFIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorafit" / "tokenized"


@dataclass(eq=False)
class Encoded:
    """The tokenized examples of one split.

    Example ``i`` has tokens ``input_ids[offsets[i]:offsets[i + 1]]``.

    Attributes:
        input_ids: int32, all examples' token ids concatenated.
        offsets: int64, shape ``(N + 1,)``, start of each example in ``input_ids``.
        token_type_ids: int8, same layout as ``input_ids``, or ``None`` when the tokenizer
            does not return them (RoBERTa).
        labels: int64 class ids, or float32 scores for regression.
        lengths: int64, shape ``(N,)``, tokens per example (including special tokens).
        split: The split name.
        max_length: The truncation length used.
        is_regression: Whether ``labels`` are scores.
        cache_key: sha256 hex naming this encoding in the cache.
        from_cache: True when this object was read from the cache rather than tokenized.
    """

    input_ids: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    token_type_ids: np.ndarray | None = field(repr=False)
    labels: np.ndarray = field(repr=False)
    split: str
    max_length: int
    is_regression: bool
    cache_key: str
    from_cache: bool = False
    lengths: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def select(self, indices: np.ndarray | list[int]) -> Encoded:
        """A new encoding holding examples ``indices``, in that order (e.g. a subsample).

        The result is never written to the cache; its ``cache_key`` is derived from this one's
        and the indices, so it still identifies the content.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Position of every kept token in the flat arrays: each example's start, repeated per
        # token, plus the token's index within the example.
        positions = np.repeat(self.offsets[indices] - offsets[:-1], lengths) + np.arange(offsets[-1])
        digest = hashlib.sha256(self.cache_key.encode("ascii") + indices.tobytes()).hexdigest()
        return Encoded(
            input_ids=self.input_ids[positions],
            offsets=offsets,
            token_type_ids=None if self.token_type_ids is None else self.token_type_ids[positions],
            labels=self.labels[indices],
            split=self.split,
            max_length=self.max_length,
            is_regression=self.is_regression,
            cache_key=digest,
            from_cache=self.from_cache,
        )

    def example(self, i: int) -> dict[str, Any]:
        """Example ``i`` as ``{"input_ids", "token_type_ids" (if any), "label"}``."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        out: dict[str, Any] = {"input_ids": self.input_ids[start:end]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[start:end]
        out["label"] = self.labels[i].item()
        return out


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # transformers sets truncation/padding on the backend as a side effect of calls made with
    # truncation=True or padding=..., so the same tokenizer would hash differently before and
    # after its first use. encode_split passes both explicitly, so they are not identity.
    backend.pop("truncation", None)
    backend.pop("padding", None)
    # to_str() writes keys in a fixed order, so no sort_keys (which, like ensure_ascii=False,
    # falls back to the slow pure-Python encoder on a 30k-entry vocabulary).
    digest = hashlib.sha256(json.dumps(backend).encode("ascii"))
    return f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}:{digest.hexdigest()}"


def cache_key(split: Split, tokenizer: Any, max_length: int) -> str:
    """sha256 (hex) of everything that determines the encoding of ``split``."""
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "tokenizer": _tokenizer_identity(tokenizer),
        # Both are tokenizer attributes outside the backend that change the output.
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "model_input_names": list(getattr(tokenizer, "model_input_names", [])),
        "max_length": int(max_length),
        "checksum": split.checksum,
        "split": split.split,
        "text_fields": list(split.task.text_fields),
        "label_names": None if split.task.label_names is None else list(split.task.label_names),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def _tokenize(split: Split, tokenizer: Any, max_length: int, key: str) -> Encoded:
    ids_chunks: list[np.ndarray] = []
    types_chunks: list[np.ndarray] = []
    lengths_chunks: list[np.ndarray] = []
    has_types: bool | None = None
    for start in range(0, len(split), _CHUNK):
        text_a = split.text_a[start : start + _CHUNK]
        text_b = None if split.text_b is None else split.text_b[start : start + _CHUNK]
        batch = tokenizer(
            text_a,
            text_b,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
        )
        ids = batch["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        lengths_chunks.append(lengths)
        ids_chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total))
        if has_types is None:
            has_types = "token_type_ids" in batch
        if has_types:
            types = batch["token_type_ids"]
            types_chunks.append(np.fromiter(itertools.chain.from_iterable(types), dtype=np.int8, count=total))
    lengths = np.concatenate(lengths_chunks)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(
        input_ids=np.concatenate(ids_chunks),
        offsets=offsets,
        token_type_ids=np.concatenate(types_chunks) if has_types else None,
        labels=np.array(split.labels, copy=True),
        split=split.split,
        max_length=max_length,
        is_regression=split.task.is_regression,
        cache_key=key,
    )


def _save(encoded: Encoded, path: Path) -> None:
    """Write ``encoded`` to ``path`` atomically: a reader sees the old file, the new one, or none."""
    from safetensors.numpy import save_file

    tensors = {"input_ids": encoded.input_ids, "offsets": encoded.offsets, "labels": encoded.labels}
    if encoded.token_type_ids is not None:
        tensors["token_type_ids"] = encoded.token_type_ids
    metadata = {
        "format": str(CACHE_FORMAT_VERSION),
        "cache_key": encoded.cache_key,
        "split": encoded.split,
        "max_length": str(encoded.max_length),
        "is_regression": str(encoded.is_regression).lower(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file lives in the target folder so os.replace is a same-filesystem rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, key: str) -> Encoded | None:
    """Read a cached encoding, or None if it is missing, unreadable or not what ``key`` names."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("cache_key") != key or metadata.get("format") != str(CACHE_FORMAT_VERSION):
                return None
            names = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
        return Encoded(
            input_ids=tensors["input_ids"],
            offsets=tensors["offsets"],
            token_type_ids=tensors.get("token_type_ids"),
            labels=tensors["labels"],
            split=metadata["split"],
            max_length=int(metadata["max_length"]),
            is_regression=metadata["is_regression"] == "true",
            cache_key=key,
            from_cache=True,
        )
    except Exception:  # noqa: BLE001 - any unreadable cache file, whatever the reader raises
        # A truncated or foreign file is a cache miss, not an error: it is rewritten below.
        return None


def encode_split(
    split: Split,
    tokenizer: Any,
    max_length: int,
    cache_dir: Path | str | None = USE_DEFAULT_CACHE,
) -> Encoded:
    """Tokenize ``split`` with a fast tokenizer (truncation to ``max_length``, no padding).

    Args:
        split: The examples to tokenize.
        tokenizer: A Hugging Face fast tokenizer (``tokenizer.is_fast``).
        max_length: Longest sequence, special tokens included; longer pairs are truncated
            longest-first, as in Hugging Face's GLUE example.
        cache_dir: Folder for cached encodings; ``None`` disables caching; by default
            :func:`default_cache_dir`.

    Returns:
        The encoding; ``from_cache`` says whether it came from the cache.

    Raises:
        LorafitError: if the tokenizer is not a fast tokenizer.
        ValueError: if ``max_length`` is not a positive integer.
    """
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise LorafitError(
            f"tokenizer: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; lorafit needs one "
            "(a tokenizer.json next to the model)"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= 0:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    max_length = int(max_length)
    key = cache_key(split, tokenizer, max_length)
    if cache_dir is USE_DEFAULT_CACHE:
        cache_dir = default_cache_dir()
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if path is not None:
        cached = _load(path, key)
        if cached is not None:
            return cached
    encoded = _tokenize(split, tokenizer, max_length, key)
    if path is not None:
        _save(encoded, path)
    return encoded
