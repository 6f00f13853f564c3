"""``lorafit predict`` on new sentences: reading them, checking them against the task, running them.

The model comes from :func:`lorafit.inference.load_trained`; the examples run as ``lorafit eval``
runs a dev split (longest first, the answers put back in input order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.data import Encoded, Split, TaskSpec, encode_split, read_table
from lorafit.errors import LorafitError
from lorafit.evaluation import predict_logits
from lorafit.inference import Trained
from lorafit.io import read_text


def read_inputs(path: str | Path) -> list[tuple[str, str | None]]:
    """Examples to predict on: .txt (a line each; a tab separates a pair), .tsv/.csv with a header
    (first one or two columns, or columns named sentence1/sentence2), or .jsonl (text/text_pair)."""
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"--input {path}: file not found")
    try:
        text = read_text(path, "input file").removeprefix("\ufeff")
    except LorafitError as e:
        raise LorafitError(f"--input {e}") from None
    pairs: list[tuple[str, str | None]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise LorafitError(f"--input {path} line {n}: not valid JSON") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise LorafitError(f"--input {path} line {n}: expected an object with a 'text' field")
            pairs.append((str(obj["text"]), obj.get("text_pair")))
    elif path.suffix in (".csv", ".tsv"):  # read as training reads them: quotes are text in a .tsv
        header, body = read_table(path, f"--input {path}")
        cols = [header.index(c) for c in ("sentence1", "sentence2") if c in header] or list(range(min(2, len(header))))
        for _, row in body:
            pairs.append((row[cols[0]], row[cols[1]] if len(cols) > 1 else None))
    else:
        for line in text.splitlines():
            if line.strip():
                a, _, b = line.partition("\t")
                pairs.append((a, b or None))
    if not pairs:
        raise LorafitError(f"--input {path}: no examples in the file")
    return pairs


def check_pairs(task: TaskSpec | None, pairs: list[tuple[str, str | None]]) -> bool:
    """Whether the examples are sentence pairs; refuses a mix, and the wrong kind for the task.

    A pair task's model given one sentence (or a one-sentence task's given two) still returns
    labels, but for an input it never saw in training: almost always a forgotten second sentence.
    """
    has_pair = [b is not None for _, b in pairs]
    if not has_pair:
        return False
    if any(has_pair) and not all(has_pair):
        n = has_pair.index(not has_pair[0]) + 1
        raise LorafitError(f"predict: either every example is a sentence pair or none is (example {n} differs "
                           f"from example 1)")
    if task is not None and (len(task.text_fields) == 2) != has_pair[0]:
        if has_pair[0]:
            raise LorafitError(f"predict: {task.name} classifies single sentences ({task.text_fields[0]}), got "
                               "sentence pairs: leave out --text-pair, or the second sentence of each --input example")
        raise LorafitError(f"predict: {task.name} is a sentence-pair task ({task.text_fields[0]}, "
                           f"{task.text_fields[1]}), got single sentences: give a --text-pair for each --text, or "
                           "pairs in --input (a tab between the two sentences of a .txt line)")
    return has_pair[0]


def encode_inputs(trained: Trained, pairs: list[tuple[str, str | None]]) -> Encoded:
    """The examples tokenized as a dev split is for evaluation (truncated, unpadded; user input is not cached)."""
    has_pair = check_pairs(trained.task, pairs)
    # A model without a recorded task still needs a task's fields here; its labels are never read.
    task = trained.task or TaskSpec("predict", None, ("text", "text_pair")[: 1 + has_pair], None, "pearson", ("pearson",))
    split = Split(task, "predict", [a for a, _ in pairs], [b or "" for _, b in pairs] if has_pair else None,
                  np.zeros(len(pairs), np.float32), source="predict input", checksum="")
    return encode_split(split, trained.tokenizer, trained.max_length, cache_dir=None)


@torch.inference_mode()
def predict_texts(trained: Trained, pairs: list[tuple[str, str | None]], batch_size: int = 64) -> list[dict[str, Any]]:
    """One record per example, in input order: label and class probabilities, or a score for regression.

    The examples run longest first, as ``lorafit eval`` runs a split (:func:`predict_logits`):
    batches of the input's order are padded to their longest example, about half of SST-2's dev
    tokens at batch 64, and the same batches give the logits ``eval`` scores, bit for bit.
    """
    model = trained.model
    labels = list(trained.task.label_names) if trained.task and trained.task.label_names else None
    if labels is None and getattr(model.config, "num_labels", 1) > 1:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data = encode_inputs(trained, pairs)
    logits = torch.from_numpy(predict_logits(model, data, batch_size, trained.tokenizer.pad_token_id or 0,
                                             trained.autocast))
    records = []
    for i, (a, b) in enumerate(pairs):
        record: dict[str, Any] = {"text": a} if b is None else {"text": a, "text_pair": b}
        if labels is None:
            record["score"] = round(float(logits[i, 0]), 6)
        else:
            probs = torch.softmax(logits[i], -1).tolist()
            record["label"] = labels[int(np.argmax(probs))]
            record["probabilities"] = {name: round(p, 6) for name, p in zip(labels, probs)}
        records.append(record)
    return records
