"""The training step the timing and profiling scripts measure is lorafit's step, on real batches."""

from __future__ import annotations

import pytest
import torch

from lorafit.bench.step import PARTS, remove_part, training_step, typical_batches
from lorafit.config import make_config
from lorafit.lora import lora_layers
from lorafit.models import load_tokenizer
from lorafit.setup import load_data


def test_typical_batches_are_full_and_of_the_median_width_and_a_step_trains_lora_and_head():
    cfg = make_config(task="rte", batch_size=4, precision="bf16", lora_dropout=0.1, max_train_samples=52, fast_dropout=True,
                      max_length=64, progress=False, num_threads=1)
    task = cfg.task_spec()  # 52 examples: 13 batches, an odd count, so the median is a batch's width
    data, _ = load_data(cfg, task, load_tokenizer(cfg.model))
    batches, width = typical_batches(cfg, data)
    assert batches and all(len(b) == 4 and data.lengths[b].max() == width for b in batches)

    model, step = training_step(cfg, task, data)
    (_, layer), *_ = lora_layers(model)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    before = [layer.lora_B.weight.detach().clone(), *(p.detach().clone() for p in head)]
    loss = step(batches[0])
    assert torch.isfinite(loss) and loss > 0
    assert layer.base_layer.weight.dtype == torch.bfloat16  # the frozen base as lorafit train stores it
    after = [layer.lora_B.weight, *head]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))  # B (zeros at start) and the head moved


@pytest.mark.parametrize("part", [p for p in PARTS if p != "dropout"])
def test_removing_a_part_changes_every_layer_and_the_step_still_trains(part):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=37, vocab_size=99)).eval()
    ids = torch.randint(0, 99, (3, 11))
    before = model(input_ids=ids).logits
    assert remove_part(model, part) == {"attention": 2, "gelu": 2, "layernorm": 4}[part]
    after = model(input_ids=ids).logits
    assert not torch.allclose(after, before)  # it computes something else now
    after.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    query_grad = grads["bert.encoder.layer.0.attention.self.query.weight"]
    # Without attention, nothing the queries compute reaches the output.
    assert (query_grad is None or not query_grad.any()) == (part == "attention")
    with pytest.raises(ValueError, match="part: expected one of attention, gelu, layernorm, dropout"):
        remove_part(model, "softmax")


def test_removing_dropout_makes_training_forwards_deterministic():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=37, vocab_size=99)).train()
    ids = torch.randint(0, 99, (3, 11))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # masks differ per call
    # Embeddings, classifier, and per layer the attention probabilities, attention output and FFN output.
    assert remove_part(model, "dropout") == 8
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
