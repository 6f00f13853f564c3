"""A run in progress between optimizer steps: evaluation, keeping the best model, checkpoints, resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafit import __version__
from lorafit.card import card_facts, write_card
from lorafit.config import TrainConfig
from lorafit.data import Encoded, TaskSpec
from lorafit.distributed import (
    check_resumable,
    full_weights,
    predict_logits_sharded,
    process_rng_states,
)
from lorafit.errors import LorafitError
from lorafit.evaluation import evaluate
from lorafit.io import atomic_dir
from lorafit.lora import save_adapter
from lorafit.metrics import compute_metrics
from lorafit.models import display_name
from lorafit.progress import Progress
from lorafit.run import RunDir
from lorafit.step_graph import host_learning_rates


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
            "optimizer": host_learning_rates(self.optimizer.state_dict()),
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
        "precision": cfg.precision,  # resolved ("auto" never): what inference computes in by default
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
