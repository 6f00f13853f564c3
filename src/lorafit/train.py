"""The training loop: LoRA (or full) fine-tuning of an encoder on one task, on Accelerate.

``train(cfg)`` reads top to bottom: set up data, model and optimizer; then per optimizer step
accumulate ``grad_accum`` micro-batches, clip, step; evaluate every epoch (or ``eval_steps``);
keep the best adapter by the task's metric; checkpoint so ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import resource
import statistics
import sys
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
from lorafit.data import Encoded, TaskSpec, batch_order, collate, custom_task, encode_split, eval_batches
from lorafit.data import TASKS, get_task, load_custom, load_split
from lorafit.errors import LorafitError
from lorafit.io import atomic_write_json, read_json
from lorafit.lora import LoRAConfig, count_parameters, inject_lora, save_adapter
from lorafit.lora.adapter import load_lora_weights
from lorafit.metrics import compute_metrics
from lorafit.models import display_name, hf_progress_bars, load_model, load_tokenizer
from lorafit.run import RunDir
from lorafit.tracking import accelerator_kwargs, check_tracker, start_tracking

# Parameters whose names contain these are not weight-decayed (as in BERT and the HF scripts).
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight")


# -- setup ------------------------------------------------------------------------------------


def resolve_task(cfg: TrainConfig) -> TaskSpec:
    """The GLUE task named by ``cfg.task``, or the user's task when custom files are given."""
    if cfg.train_file:
        # A GLUE name (the default "mrpc" included) would mislabel the user's data.
        name = "custom" if cfg.task.lower().replace("-", "") in TASKS else cfg.task
        return custom_task(
            cfg.train_file, cfg.text_columns or ["text"], cfg.label_column,
            name=name, regression=cfg.task_type == "regression",
        )
    return get_task(cfg.task)


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
    lora = LoRAConfig(cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.target_modules, cfg.modules_to_save, cfg.use_rslora)
    lora = lora.resolved(model.config.model_type)
    # Modules missing from the checkpoint are freshly initialised: they must be trained too.
    lora.modules_to_save = sorted(set(lora.modules_to_save or []) | {m for m in new_modules if "." not in m})
    inject_lora(model, lora)
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
    """Linear warm-up to the peak rate, then linear decay to 0 at ``total`` steps (the paper's)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- evaluation -------------------------------------------------------------------------------


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Encoded, batch_size: int, pad_id: int, autocast: Any) -> np.ndarray:
    """Model outputs for every example of ``data``, in file order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    for indices, batch in eval_batches(data, batch_size, pad_id):
        batch.pop("labels")
        with autocast():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
        if out is None:
            out = np.zeros((len(data), logits.shape[-1]), dtype=np.float32)
        out[indices] = logits
    model.train(was_training)
    return out if out is not None else np.zeros((0, 1), dtype=np.float32)


def evaluate(model: nn.Module, evals: dict[str, Encoded], task: TaskSpec, cfg: TrainConfig, pad_id: int,
             autocast: Any) -> dict[str, float]:
    outputs = {
        name: (predict_logits(model, data, cfg.eval_batch_size, pad_id, autocast), data.labels)
        for name, data in evals.items()
    }
    return compute_metrics(task, outputs)


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already trained on
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_epoch: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None

    def advance(self, group: list[np.ndarray], lengths: np.ndarray, epoch_done: bool) -> None:
        """Count one optimizer step over ``group`` (its micro-batches of example indices)."""
        self.step += 1
        self.examples += sum(len(g) for g in group)
        self.tokens += int(sum(lengths[g].sum() for g in group))
        self.batch_in_epoch += len(group)
        if epoch_done:  # before any checkpoint of this step, which must point at the next epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def train(cfg: TrainConfig, _interrupt_after_step: int | None = None) -> dict[str, Any]:
    """Train one run and return its summary. ``cfg.seeds`` runs are handled by :func:`train_seeds`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise LorafitError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    run = RunDir(Path(cfg.output_dir or Path("runs") / cfg.run_name()))
    run.check(cfg)
    check_tracker(cfg.report_to)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                              **accelerator_kwargs(cfg, run.path))
    set_seed(cfg.seed)

    task = resolve_task(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data, evals = load_data(cfg, task, tokenizer)
    with hf_progress_bars(cfg.progress):
        model = build_model(cfg, task)
    counts = count_parameters(model)
    optimizer = make_optimizer(model, cfg)
    run.start(cfg)
    start_tracking(accelerator, cfg, run.path)

    micro_per_epoch = len(_shard(batch_order(len(train_data), cfg.batch_size, cfg.seed, 0), accelerator))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    scheduler = linear_schedule(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    eval_every = cfg.eval_steps or steps_per_epoch

    progress, rng = Progress(), None
    if cfg.resume:
        progress, rng = _restore(run, model, optimizer, scheduler)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if rng is not None:  # last, so that nothing in between draws from the restored streams
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"]:
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
    trainable = [p for p in model.parameters() if p.requires_grad]

    bar = _progress_bar(cfg, total_steps, progress.step, accelerator)
    model.train()
    running_loss = torch.zeros((), device=accelerator.device)  # summed on device: no per-step host sync
    started = time.perf_counter() - progress.train_seconds
    while progress.step < total_steps:
        order = batch_order(len(train_data), cfg.batch_size, cfg.seed, progress.epoch,
                            train_data.lengths, cfg.group_by_length)
        order = _shard(order, accelerator)
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
                accelerator.log(_log(bar, running_loss, progress, scheduler, started, cfg.log_steps),
                                step=progress.step)
            bar.update(1)
            at_eval = progress.step % eval_every == 0 or progress.step == total_steps
            if at_eval:
                progress.train_seconds = time.perf_counter() - started
                epoch = round(progress.step / steps_per_epoch, 4)
                _evaluate_and_keep_best(cfg, run, accelerator, model, evals, task, pad_id, progress, epoch, tokenizer)
                started = time.perf_counter() - progress.train_seconds  # eval time is not train time
            if at_eval or (cfg.save_steps and progress.step % cfg.save_steps == 0):
                progress.train_seconds = time.perf_counter() - started
                _save_checkpoint(run, accelerator, model, optimizer, scheduler, progress)
            if _interrupt_after_step is not None and progress.step >= _interrupt_after_step:
                raise KeyboardInterrupt  # tests: an interruption between checkpoints
            if progress.step >= total_steps:
                break
    bar.close()
    accelerator.end_training()
    progress.train_seconds = time.perf_counter() - started
    summary = _summary(cfg, task, counts, progress, accelerator)
    if accelerator.is_main_process:
        run.write_summary(summary)
    return summary


def _shard(order: list[np.ndarray], accelerator: Any) -> list[np.ndarray]:
    """This process's batches: every n-th one, so the global batch is batch_size x processes.

    With several processes the epoch is cut to a multiple of their number, so that every process
    takes the same number of steps (as DistributedSampler's drop_last does).
    """
    n = accelerator.num_processes
    if n == 1:
        return order
    return order[: len(order) - len(order) % n][accelerator.process_index :: n]


def _accumulate(model: nn.Module, accelerator: Any, data: Encoded, group: list[np.ndarray], pad_id: int) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step; returns the loss (on device)."""
    total = torch.zeros((), device=accelerator.device)
    for i, indices in enumerate(group):
        batch = {k: v.to(accelerator.device) for k, v in collate(data, indices, pad_id).items()}
        last = i == len(group) - 1  # DDP all-reduces gradients on the last micro-batch only
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            loss = model(**batch).loss / len(group)
        accelerator.backward(loss)
        total += loss.detach()
    return total


def _log(bar: Any, running_loss: torch.Tensor, progress: Progress, scheduler: Any, started: float,
         every: int) -> dict[str, float]:
    """Show loss, learning rate and speed on the bar; return them for the tracker."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    count = progress.step % every or every
    values = {"train/loss": running_loss.item() / count, "train/learning_rate": scheduler.get_last_lr()[0],
              "train/examples_per_second": progress.examples / elapsed}
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/learning_rate']:.2e}",
                    ex_s=f"{values['train/examples_per_second']:.0f}")
    running_loss.zero_()
    return values


def _progress_bar(cfg: TrainConfig, total: int, initial: int, accelerator: Any):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{cfg.task} {cfg.method}", unit="step",
                disable=not cfg.progress or not accelerator.is_main_process, dynamic_ncols=True)


def _evaluate_and_keep_best(cfg, run, accelerator, model, evals, task, pad_id, progress: Progress, epoch: float,
                            tokenizer) -> None:
    # Dev sets are small: every process evaluates all of it; only the main process writes.
    metrics = evaluate(accelerator.unwrap_model(model), evals, task, cfg, pad_id, accelerator.autocast)
    value = metrics[task.metric]
    improved = progress.best_metric is None or value > progress.best_metric
    if improved:
        progress.best_metric, progress.best_epoch, progress.best_step = value, epoch, progress.step
        progress.best_metrics = metrics
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=progress.step)
    if not accelerator.is_main_process:
        return
    run.append_metrics({"step": progress.step, "epoch": epoch, **metrics,
                        "train_seconds": round(progress.train_seconds, 2), "best": improved})
    if improved:
        model = accelerator.unwrap_model(model)
        facts = card_facts(cfg, task, metrics, epoch)
        if cfg.method == "lora":
            # The card's facts ride in the metadata so that `lorafit merge` can card the merged model.
            save_adapter(model, run.adapter, {**_adapter_metadata(cfg, task), "card": facts})
            write_card(run.adapter, facts, "peft")
        else:
            model.save_pretrained(run.model)
            tokenizer.save_pretrained(run.model)
            write_card(run.model, facts, "transformers")


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


def _save_checkpoint(run, accelerator, model, optimizer, scheduler, progress: Progress) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    training_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    run.save_checkpoint(trainable, training_state, vars(progress).copy())


def _restore(run: RunDir, model: nn.Module, optimizer, scheduler) -> tuple[Progress, dict[str, Any]]:
    trainable, training_state, state = run.load_checkpoint()
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(trainable) != expected:
        raise LorafitError(f"{run.checkpoint}: checkpoint does not match this model's trainable parameters")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    optimizer.load_state_dict(training_state["optimizer"])
    scheduler.load_state_dict(training_state["scheduler"])
    return Progress(**state), training_state


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _summary(cfg: TrainConfig, task: TaskSpec, counts: Any, progress: Progress, accelerator: Any) -> dict[str, Any]:
    seconds = max(progress.train_seconds, 1e-9)
    return {
        "status": "finished",
        "task": task.name,
        "model": display_name(cfg.model),
        "method": cfg.method,
        "rank": cfg.rank if cfg.method == "lora" else None,
        "target_modules": cfg.target_modules,
        "seed": cfg.seed,
        "learning_rate": cfg.learning_rate,
        "metric": task.metric,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "best_step": progress.best_step,
        "best_metrics": progress.best_metrics,
        "steps": progress.step,
        "epochs": progress.epoch + (progress.batch_in_epoch > 0),
        "trainable_parameters": {"adapter": counts.adapter, "head": counts.head,
                                 "trainable": counts.trainable, "total": counts.total},
        "train_seconds": round(progress.train_seconds, 2),
        "examples_per_second": round(progress.examples / seconds, 2),
        "tokens_per_second": round(progress.tokens / seconds, 1),
        "peak_memory_gib": round(peak_memory_gib(accelerator.device), 3),
        "hardware": _hardware(accelerator.device),
        "precision": cfg.precision,
        "command": "lorafit " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "lorafit" else None,
        "lorafit_version": __version__,
    }


def _hardware(device: torch.device) -> dict[str, Any]:
    info = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def train_seeds(cfg: TrainConfig) -> dict[str, Any]:
    """One run per seed in ``<output_dir>/seed-<s>``, and the median of the best metrics."""
    if not cfg.seeds:
        return train(cfg)
    root = Path(cfg.output_dir or Path("runs") / cfg.run_name().rsplit("-seed", 1)[0])
    summaries = []
    for seed in cfg.seeds:
        sub = cfg.replace(seed=seed, seeds=None, output_dir=str(root / f"seed-{seed}"))
        if sub.resume and not RunDir(Path(sub.output_dir)).has_checkpoint():
            sub = sub.replace(resume=False)
        if RunDir(Path(sub.output_dir)).is_finished() and cfg.resume:
            summaries.append(read_json(Path(sub.output_dir) / "summary.json"))
            continue
        summaries.append(train(sub))
    values = [s["best_metric"] for s in summaries]
    result = {
        "status": "finished",
        "seeds": list(cfg.seeds),
        "metric": summaries[0]["metric"],
        "median": statistics.median(values),
        "values": values,
        "runs": [str(root / f"seed-{s}") for s in cfg.seeds],
    }
    atomic_write_json(root / "seeds_summary.json", result)
    return result
