"""The baseline a user would otherwise pick: Hugging Face ``Trainer`` + PEFT LoRA.

Set up as the PEFT and Transformers docs show it: ``get_peft_model`` with
``LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
target_modules=["query", "value"])``, ``DataCollatorWithPadding`` (pads each batch to its
longest example), AdamW with a linear schedule and 6% warm-up, and ``bf16=True`` for its bf16
setting. It trains on exactly the examples lorafit trains on (lorafit's loading and
tokenization), with the same learning rate, batch, epochs, seed and threads. Evaluation runs
after training and is not timed. peft is an optional extra: ``pip install lorafit[bench]``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Any

import numpy as np
import torch

from lorafit.bench.spec import Side, Workload
from lorafit.errors import LorafitError


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise LorafitError("the peft baseline needs peft: pip install 'lorafit[bench]' "
                           "(or leave peft out of --sides)") from None
    return peft


def _features(data: Any) -> list[dict[str, Any]]:
    """lorafit's tokenized split as the list of feature dicts a Trainer expects."""
    rows = []
    for i in range(len(data)):
        start, end = data.offsets[i], data.offsets[i + 1]
        row = {"input_ids": data.input_ids[start:end].tolist(), "attention_mask": [1] * int(end - start),
               "labels": data.labels[i].item()}
        if data.token_type_ids is not None:
            row["token_type_ids"] = data.token_type_ids[start:end].tolist()
        rows.append(row)
    return rows


def training_arguments(work: Workload, side: Side, output_dir: str, steps: int) -> Any:
    """The Trainer's arguments for the baseline: the workload's settings, the side's precision and switches."""
    from transformers import TrainingArguments

    precision = side.precision or "fp32"  # the Trainer's own default
    # Passed only when asked, so the default baseline is the Trainer exactly as a user gets it.
    # Transformers 5 names the length grouping `train_sampling_strategy`, 4.x `group_by_length`.
    grouping = {}
    if dict(side.options).get("group_by_length"):
        new = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
        grouping = {"train_sampling_strategy": "group_by_length"} if new else {"group_by_length": True}
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=work.batch_size,
        per_device_eval_batch_size=work.eval_batch_size, learning_rate=work.learning_rate,
        num_train_epochs=work.epochs, weight_decay=0.01, warmup_steps=round(0.06 * steps),
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=work.seed, bf16=precision == "bf16",
        fp16=precision == "fp16", eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=work.device == "cpu",
        **grouping,
    )


def predict_with_labels(trainer: Any, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The Trainer's logits for ``rows`` and the labels in the same order.

    The labels are the ones the Trainer hands back with its predictions, not the rows' order:
    with length grouping on, Transformers 5 also groups the evaluation batches, so predictions
    come back in its sampler's order.
    """
    predicted = trainer.predict(rows)
    logits = predicted.predictions[0] if isinstance(predicted.predictions, tuple) else predicted.predictions
    labels = np.asarray(predicted.label_ids)
    return np.asarray(logits, dtype=np.float32), labels.reshape(len(rows), *labels.shape[1:])


def peft_train(work: Workload, side: Side) -> dict[str, Any]:
    """Train the baseline once; returns its throughput, memory and dev metric."""
    peft = require_peft()
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from lorafit.bench.spec import lorafit_config, peak_memory
    from lorafit.metrics import compute_metrics
    from lorafit.models import load_tokenizer
    from lorafit.train import build_model, load_data

    precision = side.precision or "fp32"  # the Trainer's own default
    cfg = lorafit_config(work, Side("lorafit", precision), output_dir=tempfile.mkdtemp(), method="full")
    task = cfg.task_spec()
    tokenizer = load_tokenizer(cfg.model)
    train_data, evals = load_data(cfg, task, tokenizer)
    # Seeded before the head and the LoRA factors are initialised, as Hugging Face's own scripts
    # (run_glue.py) do: the Trainer seeds only when it is built, after them, and this PyTorch
    # seeds its generator at random when it starts, so an unseeded head differs from run to run.
    set_seed(work.seed)
    model = build_model(cfg, task)  # the plain model with its fresh head (method full: no lorafit LoRA)
    targets = ["query_proj", "value_proj"] if model.config.model_type == "deberta-v2" else ["query", "value"]
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=work.rank, lora_alpha=work.alpha,
                           lora_dropout=work.lora_dropout, target_modules=targets)
    model = peft.get_peft_model(model, lora)

    steps = math.ceil(len(train_data) / work.batch_size) * math.ceil(work.epochs)
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(work, side, out, steps)
        trainer = Trainer(model=model, args=args, train_dataset=_features(train_data),
                          data_collator=DataCollatorWithPadding(tokenizer))
        torch.manual_seed(work.seed)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        outputs = {name: predict_with_labels(trainer, _features(data)) for name, data in evals.items()}
        memory = peak_memory(work.device)  # after evaluation, as lorafit's summary measures it
    metrics = compute_metrics(task, outputs)
    examples = round(len(train_data) * work.epochs)
    return {
        "examples": examples,
        "tokens": round(float(train_data.lengths.sum()) * work.epochs),
        "train_seconds": seconds,
        "steps": int(result.global_step),
        "examples_per_second": examples / seconds,
        "tokens_per_second": float(train_data.lengths.sum() * work.epochs / seconds),
        "peak_memory_gib": memory,
        "metric": task.metric,
        "dev_metric": metrics[task.metric],
        "precision": precision,
        "compile_seconds": 0.0,
    }
