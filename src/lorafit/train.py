"""The training loop: LoRA (or full) fine-tuning of an encoder on one task, on Accelerate.

``train(cfg)`` reads top to bottom: set up data, model and optimizer; then per optimizer step
accumulate ``grad_accum`` micro-batches, clip, step; evaluate every epoch (or ``eval_steps``);
keep the best adapter by the task's metric; checkpoint so ``--resume`` continues bit-identically.
Evaluation itself is :mod:`lorafit.evaluation`; the run directory and summary, :mod:`lorafit.run`;
what several processes add (global batches, sharded evaluation, gathered weights), :mod:`lorafit.distributed`.
The setup helpers stay here, beside the loop that uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit import __version__
from lorafit.card import card_facts, write_card
from lorafit.config import TrainConfig
from lorafit.data import Encoded, TaskSpec, batch_order, collate, encode_split, load_custom, load_split
from lorafit.distributed import (
    check_resumable,
    check_supported,
    describe,
    fill_fsdp_wrap_policy,
    full_weights,
    global_batches,
    local_slice,
    make_accelerator,
    predict_logits_sharded,
    process_rng_states,
)
from lorafit.errors import LorafitError
from lorafit.evaluation import evaluate
from lorafit.lora import count_parameters, inject_lora, save_adapter
from lorafit.lora.adapter import load_lora_weights
from lorafit.metrics import compute_metrics
from lorafit.models import display_name, hf_progress_bars, load_model, load_tokenizer
from lorafit.run import Progress, RunDir, build_summary
from lorafit.tracking import accelerator_kwargs, check_tracker, start_tracking

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


def _set_classifier_dropout(model: nn.Module, p: float) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and ("classifier" in name or "pooler" in name or name == "dropout"):
            module.p = p


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


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


# -- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run and return its summary. ``cfg.seeds`` runs are handled by :func:`lorafit.cli.train_seeds`."""
    from accelerate.utils import set_seed

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise LorafitError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    run = RunDir(Path(cfg.output_dir or Path("runs") / cfg.run_name()))
    run.check(cfg)
    check_tracker(cfg.report_to)
    accelerator = make_accelerator({"fp32": "no"}.get(cfg.precision, cfg.precision), **accelerator_kwargs(cfg, run.path))
    if cfg.num_threads:  # after Accelerate, which sets its own thread count for CPU processes
        torch.set_num_threads(cfg.num_threads)
    accelerator.print(f"lorafit: {describe(accelerator, cfg.batch_size, cfg.grad_accum)}")
    check_supported(accelerator, cfg.grad_accum)
    set_seed(cfg.seed)

    task = cfg.task_spec()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data, evals = load_data(cfg, task, tokenizer)
    with hf_progress_bars(cfg.progress):
        model = build_model(cfg, task)
    counts = count_parameters(model)
    optimizer = make_optimizer(model, cfg)
    accelerator.wait_for_everyone()  # every process has checked the run directory before it changes
    if accelerator.is_main_process:
        run.start(cfg)
    start_tracking(accelerator, cfg, run.path)

    micro_per_epoch = len(_epoch_batches(cfg, train_data, 0, accelerator))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    scheduler = linear_schedule(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    eval_every = cfg.eval_steps or steps_per_epoch

    progress, rng = Progress(), None
    if cfg.resume:
        progress, rng = _restore(run, model, optimizer, scheduler, accelerator)
    fill_fsdp_wrap_policy(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if rng is not None:  # last, so that nothing in between draws from the restored streams
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"]:
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
    state = _Session(cfg, run, accelerator, model, optimizer, scheduler, task, tokenizer, pad_id, evals, progress)
    trainable = [p for p in model.parameters() if p.requires_grad]

    bar = _progress_bar(cfg, total_steps, progress.step, accelerator)
    model.train()
    running_loss = torch.zeros((), device=accelerator.device)  # summed on device: no per-step host sync
    started = time.perf_counter() - progress.train_seconds
    while progress.step < total_steps:
        order = _epoch_batches(cfg, train_data, progress.epoch, accelerator)
        for start in range(progress.batch_in_epoch, len(order), cfg.grad_accum):
            group = order[start : start + cfg.grad_accum]
            running_loss += _accumulate(model, accelerator, train_data, group, pad_id)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.advance(group, train_data.lengths, epoch_done=start + len(group) >= len(order))
            if progress.step % cfg.log_steps == 0 or progress.step == total_steps:
                values = _log(bar, running_loss, progress, scheduler, started, cfg.log_steps, run, accelerator)
                accelerator.log(values, step=progress.step)
            bar.update(1)
            at_eval = progress.step % eval_every == 0 or progress.step == total_steps
            if at_eval:
                progress.train_seconds = time.perf_counter() - started
                state.evaluate_and_keep_best(epoch=round(progress.step / steps_per_epoch, 4))
                started = time.perf_counter() - progress.train_seconds  # eval time is not train time
            if at_eval or (cfg.save_steps and progress.step % cfg.save_steps == 0):
                progress.train_seconds = time.perf_counter() - started
                state.save_checkpoint()
            if progress.step >= total_steps:
                break
    bar.close()
    accelerator.end_training()
    progress.train_seconds = time.perf_counter() - started
    summary = build_summary(cfg, task, counts, progress, accelerator.device, accelerator.num_processes)
    if accelerator.is_main_process:
        run.write_summary(summary)
    accelerator.wait_for_everyone()  # the run is finished for every process once its summary exists
    return summary


def _epoch_batches(cfg: TrainConfig, data: Encoded, epoch: int, accelerator: Any) -> list[np.ndarray]:
    """The epoch's global micro-batches (batch_size x processes examples); each process takes a slice."""
    n = accelerator.num_processes
    order = batch_order(len(data), cfg.batch_size * n, cfg.seed, epoch, data.lengths, cfg.group_by_length)
    return global_batches(order, n)


def _accumulate(model: nn.Module, accelerator: Any, data: Encoded, group: list[np.ndarray], pad_id: int) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step; returns this process's
    share of the loss (on device; the mean over processes is the step's loss)."""
    total = torch.zeros((), device=accelerator.device)
    for i, global_batch in enumerate(group):
        indices, weight = local_slice(global_batch, accelerator.num_processes, accelerator.process_index)
        batch = {k: v.to(accelerator.device) for k, v in collate(data, indices, pad_id).items()}
        last = i == len(group) - 1  # DDP all-reduces gradients on the last micro-batch only
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            loss = model(**batch).loss * weight / len(group)
        accelerator.backward(loss)
        total += loss.detach()
    return total


def _log(bar: Any, running_loss: torch.Tensor, progress: Progress, scheduler: Any, started: float, every: int,
         run: RunDir, accelerator: Any) -> dict[str, float]:
    """Show loss, learning rate and speed on the bar and in train_loss.jsonl; return them for the tracker."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    count = progress.step % every or every
    # Each process holds its weighted share; their mean is the loss of the global batches.
    loss = accelerator.reduce(running_loss, "mean").item() / count
    lr = scheduler.get_last_lr()[0]
    values = {"train/loss": loss, "train/learning_rate": lr, "train/examples_per_second": progress.examples / elapsed}
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{values['train/examples_per_second']:.0f}")
    if accelerator.is_main_process:
        run.append_train_loss({"step": progress.step, "loss": loss, "learning_rate": lr})
    running_loss.zero_()
    return values


def _progress_bar(cfg: TrainConfig, total: int, initial: int, accelerator: Any):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{cfg.task} {cfg.method}", unit="step",
                disable=not cfg.progress or not accelerator.is_main_process, dynamic_ncols=True)


@dataclass
class _Session:
    """What evaluating and checkpointing need of a run in progress (the model as Accelerate prepared it)."""

    cfg: TrainConfig
    run: RunDir
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    task: TaskSpec
    tokenizer: Any
    pad_id: int
    evals: dict[str, Encoded]
    progress: Progress

    def evaluate_and_keep_best(self, epoch: float) -> None:
        """Evaluate, log the metrics, and save the model when it is the best so far."""
        acc, progress, cfg = self.accelerator, self.progress, self.cfg
        if acc.num_processes == 1:
            metrics = evaluate(acc.unwrap_model(self.model), self.evals, self.task, cfg.eval_batch_size,
                               self.pad_id, acc.autocast)
        else:  # the processes share the dev set out and gather the logits (see predict_logits_sharded)
            metrics = compute_metrics(self.task, {
                name: (predict_logits_sharded(self.model, data, cfg.eval_batch_size, self.pad_id, acc.autocast,
                                              acc), data.labels)
                for name, data in self.evals.items()
            })
        value = metrics[self.task.metric]
        improved = progress.best_metric is None or value > progress.best_metric
        if improved:
            progress.best_metric, progress.best_epoch, progress.best_step = value, epoch, progress.step
            progress.best_metrics = metrics
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=progress.step)
        if acc.is_main_process:
            self.run.append_metrics({"step": progress.step, "epoch": epoch, **metrics,
                                     "train_seconds": round(progress.train_seconds, 2), "best": improved})
        if not improved:  # the same on every process: the metrics were computed from the same logits
            return
        with full_weights(acc, self.model):
            if not acc.is_main_process:
                return
            model = acc.unwrap_model(self.model)
            facts = card_facts(cfg, self.task, metrics, epoch)
            if cfg.method == "lora":
                # The card's facts ride in the metadata so that `lorafit merge` can card the merged model.
                save_adapter(model, self.run.adapter, {**_adapter_metadata(cfg, self.task), "card": facts},
                             base_model=display_name(cfg.model))
                write_card(self.run.adapter, facts, "peft")
            else:
                model.save_pretrained(self.run.model)
                self.tokenizer.save_pretrained(self.run.model)
                write_card(self.run.model, facts, "transformers")

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        # Dropout draws from each process's own RNG stream: all of them are saved, in rank order.
        rngs = process_rng_states(acc) if acc.num_processes > 1 else None
        with full_weights(acc, self.model):
            unwrapped = acc.unwrap_model(self.model)
            trainable = {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
        if not acc.is_main_process:
            return
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "num_processes": acc.num_processes,
        }
        if rngs is not None:
            training_state["process_rng"] = rngs
        self.run.save_checkpoint(trainable, training_state, vars(self.progress).copy())


def _adapter_metadata(cfg: TrainConfig, task: TaskSpec) -> dict[str, Any]:
    return {
        "model": display_name(cfg.model),
        "model_arg": cfg.model,
        "task": task.name,
        "task_spec": dataclasses.asdict(task),
        "label_names": list(task.label_names) if task.label_names else None,
        "num_labels": task.num_labels,
        "max_length": cfg.max_length,
        "lorafit_version": __version__,
    }


def _restore(run: RunDir, model: nn.Module, optimizer, scheduler, accelerator) -> tuple[Progress, dict[str, Any]]:
    trainable, training_state, state = run.load_checkpoint()
    check_resumable(accelerator, training_state.get("num_processes", 1))
    if "process_rng" in training_state:
        training_state["torch_rng"] = training_state["process_rng"][accelerator.process_index]
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != expected:
        raise LorafitError(f"{run.checkpoint}: checkpoint does not match this model's trainable parameters")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    optimizer.load_state_dict(training_state["optimizer"])
    scheduler.load_state_dict(training_state["scheduler"])
    progress = Progress(**state)
    if accelerator.is_main_process:  # steps trained after the checkpoint are trained again
        run.trim_train_loss(progress.step)
    return progress, training_state
