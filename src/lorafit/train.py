"""The training loop: LoRA (or full) fine-tuning of an encoder on one task, on Accelerate.

``train(cfg)`` reads top to bottom: set up data, model and optimizer; then per optimizer step
accumulate ``grad_accum`` micro-batches, clip, step; evaluate every epoch (or ``eval_steps``);
keep the best adapter by the task's metric; checkpoint so ``--resume`` continues bit-identically.
Evaluation itself is :mod:`lorafit.evaluation`; the run directory and summary, :mod:`lorafit.run`;
what several processes add (global batches, sharded evaluation, gathered weights), :mod:`lorafit.distributed`.
Setting a run up (data, model, optimizer, schedule) is :mod:`lorafit.setup`; evaluating, keeping
the best model and checkpointing a run in progress, :mod:`lorafit.session`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit import allocator, cpu_dropout, fastpath, head_row, mt_masks, step_graph
from lorafit.config import TrainConfig
from lorafit.data import Encoded, batch_order, collate
from lorafit.distributed import (
    check_supported,
    describe,
    fill_fsdp_wrap_policy,
    global_batches,
    local_slice,
    make_accelerator,
)
from lorafit.divergence import DivergenceGuard
from lorafit.errors import LorafitError
from lorafit.lora import count_parameters
from lorafit.models import hf_progress_bars, load_tokenizer
from lorafit.paths import check_output
from lorafit.progress import Progress, build_summary
from lorafit.run import RunDir
from lorafit.session import _restore, _Session
from lorafit.setup import (
    build_model,
    check_max_length,
    linear_schedule,
    load_data,
    make_optimizer,
    output_inputs,
)
from lorafit.tracking import accelerator_kwargs, check_tracker, start_tracking

# -- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run and return its summary. ``cfg.seeds`` runs are handled by :func:`lorafit.cli.train_seeds`."""
    from accelerate.utils import set_seed

    from lorafit.bench.env import physical_cores

    device = fastpath.resolve_device(cfg.device)
    run = RunDir(Path(cfg.output_dir or Path("runs") / cfg.run_name()))
    check_output("--output-dir", run.path, output_inputs(cfg))
    run.check(cfg)
    precision = fastpath.resolve_precision(cfg.precision, device, run.recorded_precision() if cfg.resume else None)
    if precision == "fp16" and device.type != "cuda":
        raise LorafitError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    asked_bf16 = "precision bf16 (the flag or the config)" if cfg.precision == "bf16" else \
        "the run resumes in bf16, as it started"
    cfg = cfg.replace(precision=precision)  # config.yaml and the summary record what "auto" became
    frozen_bf16 = fastpath.resolve_frozen_bf16(cfg.frozen_bf16, precision, cfg.method)
    buckets = fastpath.bucket_lengths(cfg.length_buckets, cfg.max_length, cfg.compile)
    check_tracker(cfg.report_to)
    accelerator = make_accelerator({"fp32": "no"}.get(precision, precision), device,
                                   **accelerator_kwargs(cfg, run.path))
    if accelerator.is_main_process:
        fastpath.warn_if_slow_bf16(precision, device, asked_bf16)
    # After Accelerate, which sets its own thread count for CPU processes (cores / processes). One
    # process takes every physical core: hyper-threads share a core's matrix units and only contend.
    if cfg.num_threads or accelerator.num_processes == 1:
        torch.set_num_threads(cfg.num_threads or physical_cores())
    malloc = allocator.check_loaded(cfg.allocator)
    # glibc's tunables: another allocator keeps freed memory by itself.
    reuse_memory = cfg.reuse_memory and device.type == "cpu" and malloc == "system" and allocator.reuse_freed_memory()
    accelerator.print(f"lorafit: {describe(accelerator, cfg.batch_size, cfg.grad_accum)}")
    check_supported(accelerator, cfg.grad_accum)
    if cfg.compile and cfg.compile_mode == "step-graph":
        step_graph.check_supported(device, precision, cfg.grad_accum, accelerator.num_processes)
    set_seed(cfg.seed)

    task = cfg.task_spec()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data, evals = load_data(cfg, task, tokenizer)
    with hf_progress_bars(cfg.progress):
        model = build_model(cfg, task)
    check_max_length(model, cfg.max_length)
    if cfg.fast_dropout:
        cpu_dropout.use_fast_dropout(model)
    elif cfg.vectorised_masks and device.type == "cpu" and not cfg.compile:  # the same numbers, less work
        cpu_dropout.use_vectorised_dropout(model)  # (inductor draws its own masks: nothing to do there)
    # After the dropout swaps above: the last layer's masks are hooked on the modules that draw them.
    first_row = head_row.first_row_only(model, same_masks=not cfg.compile) if cfg.cls_only_last_layer else None
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
    step_model, mode, graphs = model, fastpath.compile_mode(cfg.compile_mode, accelerator.device), None
    if cfg.compile:
        step_model = fastpath.compile_model(model, "default" if mode == "step-graph" else mode, 2 * len(buckets or ()))
    if cfg.compile and mode == "step-graph":  # forward to AdamW as one CUDA graph a shape (lorafit.step_graph)
        step_graph.device_learning_rates(optimizer, accelerator.device)
        graphs = step_graph.StepGraphs(functools.partial(
            _train_step, step_model, accelerator, optimizer, trainable, cfg.max_grad_norm), accelerator.device)
    shapes = fastpath.ShapeTimer(accelerator.device, cfg.compile, fastpath.compile_warmup_steps(mode))

    bar = _progress_bar(cfg, total_steps, progress.step, accelerator)
    model.train()
    running_loss = torch.zeros((), device=accelerator.device)  # summed on device: no per-step host sync
    guard = DivergenceGuard(trainable, accelerator.device)
    # PyTorch's own dropout masks from a vectorised kernel, the same numbers (lorafit.mt_masks);
    # entered before the clock starts, since its kernels compile (or load from cache) on entry.
    with mt_masks.drawn_vectorised(cfg.vectorised_masks and accelerator.device.type == "cpu") as vectorised:
        started = time.perf_counter() - progress.train_seconds
        while progress.step < total_steps:
            order = _epoch_batches(cfg, train_data, progress.epoch, accelerator)
            for start in range(progress.batch_in_epoch, len(order), cfg.grad_accum):
                group = order[start : start + cfg.grad_accum]
                shapes.start(tuple((len(g), fastpath.padded_width(int(train_data.lengths[g].max()), buckets))
                                   for g in group), progress)
                if graphs is not None:  # one process, one micro-batch: step_graph.check_supported
                    loss = graphs(collate(train_data, group[0], pad_id, length_buckets=buckets))
                else:
                    loss = _accumulate(step_model, accelerator, train_data, group, pad_id, buckets)
                    _clip_and_step(accelerator, optimizer, trainable, cfg.max_grad_norm)
                guard.watch(loss)
                running_loss += loss
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.advance(group, train_data.lengths, epoch_done=start + len(group) >= len(order))
                shapes.stop(progress)
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
    # A compiled run's speed is that of its compiled steps; the compiling ones are compile_seconds.
    summary.update(shapes.steady_speed(progress))
    summary.update(precision=precision, compile_seconds=round(shapes.seconds, 2), speed={
        "frozen_bf16": frozen_bf16, "compile": cfg.compile, "compile_mode": mode if cfg.compile else None,
        "length_buckets": list(buckets) if buckets else None,
        "fused_optimizer": cfg.fused_optimizer, "fast_dropout": cfg.fast_dropout,
        "vectorised_masks": vectorised, "cls_only_last_layer": first_row.extent if first_row else False,
        "reuse_memory": reuse_memory, "allocator": malloc,
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


def _clip_and_step(accelerator: Any, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
                   max_grad_norm: float) -> None:
    if max_grad_norm:
        accelerator.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()


def _train_step(model: nn.Module, accelerator: Any, optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
                max_grad_norm: float, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward, backward, clipping and AdamW on one batch on the device: what a step graph captures."""
    with accelerator.autocast():
        loss = model(**batch).loss
    accelerator.backward(loss)
    _clip_and_step(accelerator, optimizer, trainable, max_grad_norm)
    return loss.detach()


def _log(bar: Any, running_loss: torch.Tensor, progress: Progress, scheduler: Any, started: float, every: int,
         run: RunDir, accelerator: Any) -> dict[str, float]:
    """Show loss, learning rate and speed on the bar and in train_loss.jsonl; return them for the tracker."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    count = progress.step % every or every
    # Each process holds its weighted share; their mean is the loss of the global batches.
    loss = accelerator.reduce(running_loss, "mean").item() / count
    lr = float(scheduler.get_last_lr()[0])  # a device tensor under --compile-mode step-graph
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
