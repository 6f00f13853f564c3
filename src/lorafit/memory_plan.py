"""The memory plan: bytes per GPU of weights, gradients, optimizer state and activations.

Computed from the shipped architecture configs (``lorafit/configs/*.json``) for LoRA and full
fine-tuning under DDP, FSDP (full shard) and DeepSpeed ZeRO-3. ``python -m lorafit.memory_plan``
prints the table that docs/scaling.md holds.

Assumptions (stated in the docs too):

* Weights, gradients and AdamW's two moments are fp32, as lorafit keeps them (``--precision
  bf16`` autocasts the matmuls; it does not change what is stored): 4 bytes per weight, 4 per
  trainable weight for its gradient, 8 per trainable weight for the optimizer.
* DDP replicates all three; FSDP full shard and ZeRO-3 divide all three by the GPU count (the
  one layer gathered for a forward or backward pass at a time is not counted).
* Activations kept for the backward pass, per encoder layer, with 16-bit activations, 1-byte
  dropout masks and no recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models", generalised to an intermediate size I):
  ``s*b*(18h + 4I) + 5*a*s*s*b`` bytes; DeBERTa's disentangled attention keeps two more
  score maps (content-to-position, position-to-content): ``+ 4*a*s*s*b``. LoRA needs nearly the
  same activations as full fine-tuning: every layer has trainable weights, so the backward pass
  runs through all of them. Activations are per GPU (batch 8 on each) and are not sharded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lorafit.models import shipped_config

GiB = 2**30
BATCH, SEQ = 8, 128
GPUS = (1, 2, 4, 8)
STRATEGIES = ("DDP", "FSDP", "ZeRO-3")
MODELS = ("roberta-large", "deberta-v2-xxlarge")
LORA_RANK = 8


@dataclass(frozen=True)
class Counts:
    total: int  # every parameter of the sequence-classification model
    lora: int  # LoRA factors on query and value
    head: int  # the trained head: classifier (and DeBERTa's pooler)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def parameter_counts(config: dict[str, Any], num_labels: int = 2, rank: int = LORA_RANK) -> Counts:
    """Parameters of a RoBERTa or DeBERTa-v2 classifier, from its config alone."""
    h, i, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    inner = config.get("attention_head_size", h // config["num_attention_heads"]) * config["num_attention_heads"]
    norm = 2 * h
    layer = 3 * _linear(h, inner) + _linear(inner, h) + norm + _linear(h, i) + _linear(i, h) + norm
    total = vocab * h + norm + layers * layer
    if config["model_type"] == "roberta":
        total += config["max_position_embeddings"] * h + config["type_vocab_size"] * h
        head = _linear(h, h) + _linear(h, num_labels)  # RobertaClassificationHead: dense, out_proj
    elif config["model_type"] == "deberta-v2":
        if config.get("position_biased_input", True):
            total += config["max_position_embeddings"] * h
        total += config.get("type_vocab_size", 0) * h
        if config.get("relative_attention"):
            buckets = config.get("position_buckets", -1)
            span = buckets if buckets > 0 else config.get("max_relative_positions", -1)
            span = span if span > 0 else config["max_position_embeddings"]
            total += 2 * span * h
            if "layer_norm" in config.get("norm_rel_ebd", "none"):
                total += norm
            if not config.get("share_att_key", False):
                raise ValueError("memory plan: DeBERTa without share_att_key is not modelled")
        if config.get("conv_kernel_size", 0) > 0:
            total += h * h * config["conv_kernel_size"] + h + norm  # grouped conv (groups=1) and its LayerNorm
        pooler = config.get("pooler_hidden_size", h)
        head = _linear(h, pooler) + _linear(pooler, num_labels)  # ContextPooler dense, classifier
    else:
        raise ValueError(f"memory plan: model type {config['model_type']!r} is not modelled")
    total += head
    lora = layers * 2 * rank * (h + inner)  # A (r x in) and B (out x r) on query and value
    return Counts(total=total, lora=lora, head=head)


def activation_bytes(config: dict[str, Any], batch: int = BATCH, seq: int = SEQ) -> int:
    """Activations kept for the backward pass (see the module docstring for the model)."""
    h, i, a = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    per_layer = seq * batch * (18 * h + 4 * i) + 5 * a * seq * seq * batch
    if config["model_type"] == "deberta-v2" and config.get("relative_attention"):
        per_layer += 4 * a * seq * seq * batch
    return config["num_hidden_layers"] * per_layer


def plan(model: str, method: str, strategy: str, gpus: int) -> dict[str, float]:
    """Bytes per GPU of each part, for one cell of the table."""
    config = shipped_config(model)
    counts = parameter_counts(config)
    trainable = counts.total if method == "full" else counts.lora + counts.head
    share = 1 if strategy == "DDP" else gpus
    return {
        "weights": 4 * counts.total / share,
        "gradients": 4 * trainable / share,
        "optimizer": 8 * trainable / share,
        "activations": float(activation_bytes(config)),
    }


def table() -> str:
    """The markdown table of docs/scaling.md (GiB per GPU)."""
    head = "| model | method | strategy | GPUs | weights | gradients | optimizer | activations | total |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        for method in ("lora", "full"):
            for strategy in STRATEGIES:
                for gpus in GPUS:
                    parts = plan(model, method, strategy, gpus)
                    cells = [f"{v / GiB:.2f}" for v in parts.values()] + [f"{sum(parts.values()) / GiB:.2f}"]
                    lines.append(f"| {model} | {method} | {strategy} | {gpus} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts_table() -> str:
    lines = ["| model | parameters | LoRA r=8 (query, value) | head |", "|---|---:|---:|---:|"]
    for model in MODELS:
        c = parameter_counts(shipped_config(model))
        lines.append(f"| {model} | {c.total:,} | {c.lora:,} | {c.head:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafit.memory_plan", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(counts_table() + "\n\n" + table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
