"""The last layer past its attention on the first token only (lorafit.head_row): in training the
same loss, gradients and random stream as the full layer; in evaluation the full layer itself."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lorafit import cpu_dropout, head_row, mt_masks
from lorafit.lora import LoRAConfig, inject_lora

# Every linear layer adapted, those past the last layer's attention included, so that LoRA's
# dropouts there draw their masks through the hooks too.
TARGETS = {"bert": ["query", "value", "dense"], "roberta": ["query", "value", "dense"],
           "deberta-v2": ["query_proj", "value_proj", "dense"]}


def _encoder(kind: str, **config) -> torch.nn.Module:
    config_class, model_class = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
        "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification),
        "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForSequenceClassification),
    }[kind]
    sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37} if kind == "distilbert" else \
        {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 37}
    torch.manual_seed(0)
    return model_class(config_class(**{**sizes, "vocab_size": 99, "max_position_embeddings": 64, "pad_token_id": 1,
                                       **config}))


def _adapted(kind: str, first_row: bool, **config) -> torch.nn.Module:
    model = _encoder(kind, **config)
    torch.manual_seed(3)  # LoRA's A draws from the default generator
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=TARGETS[kind]).resolved(kind))
    with torch.no_grad():  # a non-zero B, so that every branch changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    cpu_dropout.use_vectorised_dropout(model)
    if first_row:
        model.first_row = head_row.first_row_only(model)  # a plain attribute: not a module
        assert model.first_row is not None
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 99, (4, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _with_rows(model: torch.nn.Module, run) -> tuple[int, object]:
    """``run(model)``, and how many rows the last layer's output had."""
    rows = []
    hook = model.base_model.encoder.layer[-1].register_forward_hook(lambda m, a, out: rows.append(
        (out[0] if isinstance(out, tuple) else out).size(1)))
    try:
        result = run(model)
    finally:
        hook.remove()
    return rows[0], result


def _training_step(model: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(11)
    with mt_masks.drawn_vectorised():
        loss = model(**_batch()).loss
    loss.backward()
    # torch.rand: where the stream is after the step.
    return [loss.detach(), torch.rand(3), *(p.grad for p in model.parameters() if p.requires_grad)]


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2"])
def test_training_gives_the_full_layers_loss_gradients_and_random_stream(kind):
    rows, full = _with_rows(_adapted(kind, False).train(), _training_step)
    assert rows == 11
    model = _adapted(kind, True).train()
    query = model.base_model.encoder.layer[-1].attention.self.get_submodule(TARGETS[kind][0])
    queried = []
    query.register_forward_pre_hook(lambda m, args: queried.append(args[0].size(1)))
    rows, ours = _with_rows(model, _training_step)
    assert rows == 1
    # BERT's and RoBERTa's attention asks with the first token alone; DeBERTa's is its own.
    assert queried == [11 if kind == "deberta-v2" else 1]
    assert model.first_row.extent == ("past_attention" if kind == "deberta-v2" else "query")
    assert len(full) == len(ours) > 20
    assert torch.equal(full[1], ours[1])  # the same masks were drawn, no more and no fewer
    for a, b in zip(full, ours):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["bert", "deberta-v2"])
def test_evaluation_runs_the_full_layer_bit_for_bit(kind):
    logits = []
    for first_row in (False, True):
        with torch.inference_mode():
            rows, out = _with_rows(_adapted(kind, first_row).eval(), lambda m: m(**_batch()).logits)
        assert rows == 11
        logits.append(out)
    assert torch.equal(logits[0], logits[1])


def test_without_the_same_masks_only_the_rows_are_cut():
    """As under torch.compile, whose kernels draw their own masks: no hooks on the dropouts."""
    model = _encoder("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    twin = copy.deepcopy(model)
    assert head_row.first_row_only(model, same_masks=False).extent == "past_attention"
    hooked = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked == [model.bert.encoder.layer[-1].attention.output]
    batch = _batch()
    rows, loss = _with_rows(model.train(), lambda m: m(**batch).loss)
    assert rows == 1
    torch.testing.assert_close(loss, twin.train()(**batch).loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("kind", "config"), [
    ("distilbert", {}),  # its head reads the first token too, but its layers are built otherwise
    ("bert", {"num_hidden_layers": 1}),  # DeBERTa's first layer feeds a convolution: one layer, left alone
    ("bert", {"chunk_size_feed_forward": 4}),  # a feed-forward chunked over the sequence needs every row
])
def test_models_whose_last_layer_it_cannot_cut_are_left_as_they_are(kind, config):
    model = _encoder(kind, **config)
    assert head_row.first_row_only(model) is None and head_row.last_layer(model) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_training_run_with_it_learns_what_the_full_layer_learns(tiny_run):
    """Three steps: the same losses to rounding, and weights apart by a sliver of how far they moved.

    In fp32 on every CPU (``auto`` picks bf16 where the CPU multiplies it): these tolerances are
    fp32's rounding. In bf16 the products round at 2^-8, and three Adam steps leave the weights
    about 5% of their movement apart, as one thread instead of two leaves them 3% apart (AMX,
    2026-12-07); the bf16 runs' dev accuracies are in docs/performance.md."""
    import json

    from lorafit.train import train

    runs = {on: tiny_run(f"cls-{on}", cls_only_last_layer=on, max_steps=3, eval_steps=3, log_steps=1,
                         precision="fp32") for on in (True, False)}
    summaries = {on: train(cfg) for on, cfg in runs.items()}
    assert summaries[True]["speed"]["cls_only_last_layer"] == "query"  # the embedded BERT, on a CPU
    assert summaries[False]["speed"]["cls_only_last_layer"] is False
    losses = {on: [json.loads(line)["loss"] for line in (Path(cfg.output_dir) / "train_loss.jsonl").open()]
              for on, cfg in runs.items()}
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=0)
    weights = {on: load_file(Path(cfg.output_dir) / "checkpoint" / "trainable.safetensors") for on, cfg in runs.items()}
    assert weights[True].keys() == weights[False].keys()
    apart = torch.cat([(weights[True][k] - w).flatten() for k, w in weights[False].items()]).norm()
    moved = torch.cat([w.flatten() for k, w in weights[False].items() if "lora_B" in k]).norm()  # B starts at 0
    assert moved > 0 and apart < 1e-3 * moved, (apart, moved)
