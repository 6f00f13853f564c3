"""Setting a run up: its data, its model (with LoRA injected) and its optimizer and schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit import fastpath
from lorafit.config import TrainConfig
from lorafit.data import Encoded, TaskSpec, encode_split, load_custom, load_split
from lorafit.errors import LorafitError
from lorafit.lora import inject_lora, lora_layers
from lorafit.lora.adapter import load_lora_weights
from lorafit.models import load_model

# Parameters whose names contain these are not weight-decayed (as in BERT and the HF scripts).
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight")



# -- setup ------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, task: TaskSpec, tokenizer: Any) -> tuple[Encoded, dict[str, Encoded]]:
    """Tokenized training split and dev split(s), subsampled as the config asks."""
    if cfg.train_file:
        cols, label = cfg.text_columns or ["text"], cfg.label_column
        train_split = load_custom(cfg.train_file, cols, label, task, split="train")
        eval_splits = {"validation": load_custom(cfg.validation_file, cols, label, task, split="validation")}
    else:
        train_split = load_split(task, "train", cfg.data_dir)
        eval_splits = {s: load_split(task, s, cfg.data_dir) for s in task.eval_splits}
    train = encode_split(train_split, tokenizer, cfg.max_length)
    evals = {name: encode_split(split, tokenizer, cfg.max_length) for name, split in eval_splits.items()}
    # Subsets are drawn with a fixed seed, so runs with different --seed see the same examples.
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.select(np.random.default_rng(0).permutation(len(train))[: cfg.max_train_samples])
    if cfg.max_eval_samples:
        evals = {k: v.select(np.arange(min(cfg.max_eval_samples, len(v)))) for k, v in evals.items()}
    return train, evals


def build_model(cfg: TrainConfig, task: TaskSpec) -> nn.Module:
    model, new_modules = load_model(
        cfg.model, task.num_labels, list(task.label_names or []) or None, cfg.trust_remote_code
    )
    if cfg.classifier_dropout is not None:
        _set_classifier_dropout(model, cfg.classifier_dropout)
    if cfg.method == "full":
        return model
    lora = cfg.lora_config().resolved(model.config.model_type)
    # Modules missing from the checkpoint are freshly initialised: they must be trained too.
    heads = sorted(set(lora.modules_to_save or []) | {m for m in new_modules if "." not in m})
    inject_lora(model, dataclasses.replace(lora, modules_to_save=heads))
    if cfg.init_adapter:
        load_lora_weights(model, cfg.init_adapter)
    return model


def check_max_length(model: nn.Module, max_length: int) -> None:
    """Refuse a ``--max-length`` longer than the model's absolute position embeddings."""
    config = model.config
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa: relative positions only
        return
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return
    # RoBERTa numbers positions from padding_idx + 1, so two of its 514 embeddings are unusable.
    usable = positions - (config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0)
    if max_length > usable:
        raise LorafitError(f"--max-length {max_length}: longer than the model's {usable} position embeddings "
                           f"(use --max-length {usable} or less)")


def output_inputs(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """The files and folders a run reads, which its output directory must stay clear of."""
    model = cfg.model if Path(cfg.model).expanduser().exists() else None
    return [("--train-file", cfg.train_file), ("--validation-file", cfg.validation_file),
            ("--data-dir", cfg.data_dir), ("--init-adapter", cfg.init_adapter), ("--model", model)]


def _set_classifier_dropout(model: nn.Module, p: float) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and ("classifier" in name or "pooler" in name or name == "dropout"):
            module.p = p


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, biases and LayerNorms without weight decay.

    With LoRA+ (Hayou et al., ICML 2024) the B matrices get their own group at
    ``loraplus_lr_ratio`` times the learning rate; A and DoRA magnitudes keep the base rate. With
    ``head_learning_rate`` the trained head (everything trainable outside the LoRA layers) gets
    two groups of its own at that rate: a freshly initialised dense layer, such as MiniLM's
    never-trained pooler, may want a full-fine-tuning rate rather than LoRA's larger one. The
    groups are always in this order (decay, no decay, LoRA+ B, head decay, head no decay), so a
    checkpoint's optimizer state lines up on resume. The schedule scales every group alike.
    """
    decay, no_decay, lora_b, head_decay, head_no_decay = [], [], [], [], []
    b_ids = {id(layer.lora_B.weight) for _, layer in lora_layers(model)} if cfg.loraplus_lr_ratio else set()
    split_head = cfg.method == "lora" and cfg.head_learning_rate is not None
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in layer.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = any(k in name for k in NO_DECAY)
        if id(p) in b_ids:
            lora_b.append(p)
        elif split_head and id(p) not in adapter_ids:
            (head_no_decay if plain else head_decay).append(p)
        else:
            (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.loraplus_lr_ratio:
        groups.append({"params": lora_b, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate * cfg.loraplus_lr_ratio})
    if split_head:
        groups += [{"params": head_decay, "weight_decay": cfg.weight_decay, "lr": cfg.head_learning_rate},
                   {"params": head_no_decay, "weight_decay": 0.0, "lr": cfg.head_learning_rate}]
    params = decay + no_decay + lora_b + head_decay + head_no_decay
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             **fastpath.adamw_kwargs(cfg.fused_optimizer, params))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak rate, then linear decay to 0 at ``total`` steps.

    The shape of the paper's schedule (its scripts use ``transformers.get_linear_schedule_with_warmup``),
    but not its formula: during warm-up this takes ``(step + 1) / (warmup + 1)`` of the peak rate,
    where the Transformers one takes ``step / warmup`` and so spends its first step at rate 0. It
    is kept because the committed reproduction runs (docs/reproduction) were trained with it, and
    their ``lorafit train`` commands must give the same numbers again.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
