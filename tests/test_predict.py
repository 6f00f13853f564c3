"""Predicting new sentences: what the examples must be, and how they run (longest first, answered in order)."""

from __future__ import annotations

import numpy as np
import pytest

from lorafit.errors import LorafitError
from lorafit.inference import load_trained
from lorafit.predict import check_pairs, predict_texts


def test_examples_must_be_the_kind_the_task_trained_on():
    from lorafit.data import get_task

    assert check_pairs(get_task("mrpc"), [("a", "b"), ("c", "d")]) is True
    assert check_pairs(get_task("sst2"), [("a", None)]) is False
    assert check_pairs(None, [("a", "b")]) is True  # a model without a recorded task takes either
    with pytest.raises(LorafitError, match=r"^predict: sst2 classifies single sentences \(sentence\), got sentence pairs"):
        check_pairs(get_task("sst2"), [("a", "b")])
    with pytest.raises(LorafitError, match=r"^predict: rte is a sentence-pair task \(sentence1, sentence2\), got single"):
        check_pairs(get_task("rte"), [("a", None)])
    with pytest.raises(LorafitError, match=r"none is \(example 3 differs from example 1\)"):
        check_pairs(None, [("a", "b"), ("c", "d"), ("e", None)])


def test_predict_runs_longest_first_and_answers_in_input_order(bf16_run, one_thread, bf16_cpu):
    from lorafit.data import encode_split, load_split
    from lorafit.evaluation import predict_logits

    run, _ = bf16_run
    trained = load_trained(run, merge=False, precision="trained")
    dev = load_split(trained.task, "validation", None)
    pairs = list(zip(dev.text_a[:24], dev.text_b[:24]))
    encoded = encode_split(dev, trained.tokenizer, trained.max_length).select(np.arange(24))
    widths = []
    hook = trained.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                                   with_kwargs=True)
    records = predict_texts(trained, pairs, batch_size=8)
    hook.remove()
    assert [(r["text"], r["text_pair"]) for r in records] == pairs
    # Longest first, so each batch pads little; in input order these 24 would cost more tokens.
    longest_first = sorted(encoded.lengths.tolist(), reverse=True)
    assert widths == [(8, longest_first[i]) for i in (0, 8, 16)]
    input_order = sum(8 * max(encoded.lengths[i : i + 8]) for i in (0, 8, 16))
    assert sum(b * w for b, w in widths) < input_order
    # The logits `lorafit eval` computes for these examples at this batch size, in input order.
    logits = predict_logits(trained.model, encoded, 8, trained.tokenizer.pad_token_id, trained.autocast)
    assert [r["score"] for r in records] == [round(float(x), 6) for x in logits[:, 0]]
    alone = [predict_texts(trained, [pair], batch_size=1)[0]["score"] for pair in pairs[:6]]
    assert alone == pytest.approx([r["score"] for r in records[:6]], abs=0.05)


def test_predict_needs_no_recorded_task(bf16_run, tmp_path, one_thread):

    run, _ = bf16_run
    trained = load_trained(run, precision="fp32")
    trained.task = None  # as for a PEFT adapter or a plain model folder
    records = predict_texts(trained, [("a man plays", "a man is playing"), ("dogs", "two cats sleep")], batch_size=2)
    assert [set(r) for r in records] == [{"text", "text_pair", "score"}] * 2
    assert len({r["score"] for r in records}) == 2
