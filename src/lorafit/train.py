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

from lorafit import __version__, fastpath
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
from lorafit.divergence import DivergenceGuard
from lorafit.errors import LorafitError
from lorafit.evaluation import evaluate
from lorafit.io import atomic_dir
from lorafit.lora import count_parameters, inject_lora, lora_layers, save_adapter
from lorafit.lora.adapter import load_lora_weights
from lorafit.metrics import compute_metrics
from lorafit.models import display_name, hf_progress_bars, load_model, load_tokenizer
from lorafit.paths import check_output
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
    ``loraplus_lr_ratio`` times the learning rate; everything else (A, DoRA magnitudes, the head)
    keeps the base rate. The schedule scales every group's rate by the same factor.
    """
    decay, no_decay, lora_b = [], [], []
    b_ids = {id(layer.lora_B.weight) for _, layer in lora_layers(model)} if cfg.loraplus_lr_ratio else set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora_b if id(p) in b_ids else no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.loraplus_lr_ratio:
        groups.append({"params": lora_b, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate * cfg.loraplus_lr_ratio})
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             **fastpath.adamw_kwargs(cfg.fused_optimizer, decay + no_decay + lora_b))


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

    from lorafit.bench.env import physical_cores

    device = fastpath.resolve_device(cfg.device)
    precision = fastpath.resolve_precision(cfg.precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise LorafitError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    frozen_bf16 = fastpath.resolve_frozen_bf16(cfg.frozen_bf16, precision, cfg.method)
    buckets = fastpath.bucket_lengths(cfg.length_buckets, cfg.max_length, cfg.compile)
    run = RunDir(Path(cfg.output_dir or Path("runs") / cfg.run_name()))
    check_output("--output-dir", run.path, output_inputs(cfg))
    run.check(cfg)
    check_tracker(cfg.report_to)
    accelerator = make_accelerator({"fp32": "no"}.get(precision, precision), device,
                                   **accelerator_kwargs(cfg, run.path))
    # After Accelerate, which sets its own thread count for CPU processes (cores / processes). One
    # process takes every physical core: hyper-threads share a core's matrix units and only contend.
    if cfg.num_threads or accelerator.num_processes == 1:
        torch.set_num_threads(cfg.num_threads or physical_cores())
    accelerator.print(f"lorafit: {describe(accelerator, cfg.batch_size, cfg.grad_accum)}")
    check_supported(accelerator, cfg.grad_accum)
    set_seed(cfg.seed)

    task = cfg.task_spec()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data, evals = load_data(cfg, task, tokenizer)
    with hf_progress_bars(cfg.progress):
        model = build_model(cfg, task)
    check_max_length(model, cfg.max_length)
    counts = count_parameters(model)
    if frozen_bf16:
        fastpath.cast_frozen_linears(model)
    optimizer = make_optimizer(model, cfg)
    # Everything that can be checked has been: only now may --overwrite clear the old run.
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
    if accelerator.is_main_process:  # a resumed run evaluates again after its checkpoint
        run.trim_metrics(progress.step)
    fill_fsdp_wrap_policy(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if rng is not None:  # last, so that nothing in between draws from the restored streams
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"]:
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
    state = _Session(cfg, run, accelerator, model, optimizer, scheduler, task, tokenizer, pad_id, evals, progress)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Only the training step is compiled; evaluation and saving use the plain module.
    step_model = model
    if cfg.compile:
        step_model = fastpath.compile_model(model, fastpath.compile_mode(cfg.compile_mode, accelerator.device),
                                            2 * len(buckets or ()))
    shapes = fastpath.ShapeTimer(accelerator.device, enabled=cfg.compile)

    bar = _progress_bar(cfg, total_steps, progress.step, accelerator)
    model.train()
    running_loss = torch.zeros((), device=accelerator.device)  # summed on device: no per-step host sync
    guard = DivergenceGuard(trainable, accelerator.device)
    started = time.perf_counter() - progress.train_seconds
    while progress.step < total_steps:
        order = _epoch_batches(cfg, train_data, progress.epoch, accelerator)
        for start in range(progress.batch_in_epoch, len(order), cfg.grad_accum):
            group = order[start : start + cfg.grad_accum]
            shapes.start(tuple((len(g), fastpath.padded_width(int(train_data.lengths[g].max()), buckets))
                               for g in group))
            loss = _accumulate(step_model, accelerator, train_data, group, pad_id, buckets)
            guard.watch(loss)
            running_loss += loss
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            shapes.stop()
            progress.advance(group, train_data.lengths, epoch_done=start + len(group) >= len(order))
            if progress.step % cfg.log_steps == 0 or progress.step == total_steps:
                values = _log(bar, running_loss, progress, scheduler, started, cfg.log_steps, run, accelerator)
                accelerator.log(values, step=progress.step)
            bar.update(1)
            at_eval = progress.step % eval_every == 0 or progress.step == total_steps
            at_save = at_eval or (cfg.save_steps and progress.step % cfg.save_steps == 0)
            if at_save or progress.step % cfg.log_steps == 0:
                # Before NaN weights are evaluated or saved; the weights themselves only then.
                guard.check(cfg, run, progress, accelerator, weights=bool(at_save))
            if at_eval:
                progress.train_seconds = time.perf_counter() - started
                state.evaluate_and_keep_best(epoch=round(progress.step / steps_per_epoch, 4))
                started = time.perf_counter() - progress.train_seconds  # eval time is not train time
            if at_save:
                progress.train_seconds = time.perf_counter() - started
                state.save_checkpoint()
            if progress.step >= total_steps:
                break
    bar.close()
    # Not accelerator.end_training(): it also destroys the process group, which the summary's
    # barrier and any further seeds still need.
    for tracker in accelerator.trackers:
        tracker.finish()
    progress.train_seconds = time.perf_counter() - started
    summary = build_summary(cfg, task, counts, progress, accelerator.device, accelerator.num_processes)
    summary.update(precision=precision, compile_seconds=round(shapes.seconds, 2), speed={
        "frozen_bf16": frozen_bf16, "compile": cfg.compile, "length_buckets": list(buckets) if buckets else None,
        "fused_optimizer": cfg.fused_optimizer,
        "attention": getattr(accelerator.unwrap_model(model).config, "_attn_implementation", None)})
    if accelerator.is_main_process:
        run.write_summary(summary)
    accelerator.wait_for_everyone()  # the run is finished for every process once its summary exists
    return summary


def _epoch_batches(cfg: TrainConfig, data: Encoded, epoch: int, accelerator: Any) -> list[np.ndarray]:
    """The epoch's global micro-batches (batch_size x processes examples); each process takes a slice."""
    n = accelerator.num_processes
    order = batch_order(len(data), cfg.batch_size * n, cfg.seed, epoch, data.lengths, cfg.group_by_length)
    return global_batches(order, n)


def _accumulate(model: nn.Module, accelerator: Any, data: Encoded, group: list[np.ndarray], pad_id: int,
                buckets: tuple[int, ...] | None = None) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step; returns this process's
    share of the loss (on device; the mean over processes is the step's loss)."""
    total = torch.zeros((), device=accelerator.device)
    for i, global_batch in enumerate(group):
        indices, weight = local_slice(global_batch, accelerator.num_processes, accelerator.process_index)
        batch = fastpath.to_device(collate(data, indices, pad_id, length_buckets=buckets), accelerator.device)
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
        # The best model first, then the line that calls it best: a failed write leaves no such line.
        # ``improved`` is the same on every process: the metrics come from the same gathered logits.
        if improved:
            with full_weights(acc, self.model):
                if acc.is_main_process:
                    model = acc.unwrap_model(self.model)
                    facts = card_facts(cfg, self.task, metrics, epoch)
                    final = self.run.adapter if cfg.method == "lora" else self.run.model
                    with atomic_dir(final) as tmp:
                        if cfg.method == "lora":
                            # The card's facts ride in the metadata so that `lorafit merge` can card the
                            # merged model.
                            save_adapter(model, tmp, {**_adapter_metadata(cfg, self.task), "card": facts},
                                         base_model=display_name(cfg.model))
                        else:
                            model.save_pretrained(tmp)
                            self.tokenizer.save_pretrained(tmp)
                        write_card(tmp, facts, "peft" if cfg.method == "lora" else "transformers", final)
        if acc.is_main_process:
            self.run.append_metrics({"step": progress.step, "epoch": epoch, **metrics,
                                     "train_seconds": round(progress.train_seconds, 2), "best": improved})

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
    for name, value in trainable.items():
        if value.shape != params[name].shape:
            raise LorafitError(f"{run.checkpoint}: '{name}' has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(params[name].shape)}")
    try:
        progress = Progress(**state)
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise LorafitError(f"{run.checkpoint}: checkpoint state does not fit this run ({e})") from None
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    if accelerator.is_main_process:  # steps trained after the checkpoint are trained again
        run.trim_train_loss(progress.step)
    return progress, training_state
