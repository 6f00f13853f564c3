"""The run directory: what a training run leaves on disk, and its resumable checkpoint.

    <run>/config.yaml        the resolved TrainConfig
    <run>/metrics.jsonl      one line per evaluation
    <run>/summary.json       best metric and epoch, parameter counts, time, speed, memory
    <run>/adapter/           the best adapter, PEFT format (LoRA runs)
    <run>/model/             the best model, save_pretrained format (full fine-tuning runs)
    <run>/checkpoint/        the latest training state, for --resume

Every file is written atomically; the checkpoint folder is swapped in whole, so a crash at any
moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load, save

from lorafit.config import RUNTIME_KEYS, TrainConfig
from lorafit.errors import LorafitError
from lorafit.io import (
    append_line,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    os_error,
    read_json,
    read_yaml_mapping,
    recover_dir,
)

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
# What a run writes; --overwrite removes exactly these, and nothing else in the folder.
OWNED = (SUMMARY, METRICS, CONFIG, "adapter", "model", CHECKPOINT, *(f"{n}.{s}" for n in ("adapter", "model", CHECKPOINT)
                                                                    for s in ("old", "new")))


@dataclass
class RunDir:
    path: Path

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def is_finished(self) -> bool:
        summary = self.path / SUMMARY
        return summary.exists() and read_json(summary).get("status") == "finished"

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "state.json").exists() or (self.path / f"{CHECKPOINT}.old" / "state.json").exists()

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a directory that --overwrite/--resume do not allow; writes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise LorafitError(f"--output-dir {self.path}: exists and is not a directory")
        if cfg.resume:
            if not self.has_checkpoint():
                raise LorafitError(f"--resume: {self.path} has no checkpoint to resume from")
            saved = read_yaml_mapping(self.path / CONFIG, "run config")
            changed = {k for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS and saved.get(k) != v}
            if changed:
                raise LorafitError(
                    f"--resume: settings differ from the run in {self.path}: {', '.join(sorted(changed))} "
                    "(resume with the same settings)"
                )
            return
        if self.is_finished() and not cfg.overwrite:
            raise LorafitError(
                f"--output-dir {self.path}: holds a finished run; pass --overwrite to replace it"
            )
        if self.has_checkpoint() and not cfg.overwrite:
            raise LorafitError(
                f"--output-dir {self.path}: holds an unfinished run; pass --resume to continue it "
                "or --overwrite to start again"
            )
        leftovers = [n for n in (METRICS, "adapter", "model", SUMMARY) if (self.path / n).exists()]
        if leftovers and not cfg.overwrite:  # a run stopped before its first checkpoint
            raise LorafitError(
                f"--output-dir {self.path}: holds files of another run ({', '.join(leftovers)}) and no checkpoint "
                "to resume; pass --overwrite to replace them"
            )

    def start(self, cfg: TrainConfig) -> None:
        """Clear what --overwrite replaces and write the resolved config (called once the model
        and data have loaded, so bad input leaves no half-made run behind)."""
        if cfg.resume:
            for name in ("adapter", "model"):
                recover_dir(self.path / name)
            return
        try:
            if self.path.exists() and cfg.overwrite:
                for name in OWNED:
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(self.path, e, "could not prepare the run directory") from e
        atomic_write_bytes(self.path / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line(self.path / METRICS, json.dumps(record))

    def trim_metrics(self, step: int) -> None:
        """Drop the lines of evaluations after ``step`` (the checkpoint a resumed run starts from):
        a run killed between an evaluation and its checkpoint evaluates again, and must not
        record that evaluation twice."""
        path = self.path / METRICS
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and _step_of(line) <= step]
        if len(kept) != len(lines):
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    # -- checkpoint ---------------------------------------------------------------------------

    def save_checkpoint(
        self, trainable: dict[str, torch.Tensor], training_state: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Write the checkpoint into ``checkpoint.new/`` and swap it in (the old one stays on failure)."""
        buffer = io.BytesIO()
        torch.save(training_state, buffer)
        with atomic_dir(self.checkpoint) as new:
            weights = save({k: v.detach().contiguous().cpu() for k, v in trainable.items()})
            atomic_write_bytes(new / "trainable.safetensors", weights)
            atomic_write_bytes(new / "training_state.pt", buffer.getvalue())
            atomic_write_json(new / "state.json", state)

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """The checkpoint's trainable tensors, optimizer/scheduler/RNG state and progress.

        Raises:
            LorafitError: naming the file that is missing, truncated or not what lorafit writes.
        """
        folder = self.checkpoint
        if not (folder / "state.json").exists():  # crashed between the two renames
            folder = self.path / f"{CHECKPOINT}.old"
        state = read_json(folder / "state.json", "checkpoint state")
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise LorafitError(f"{folder / 'state.json'}: not a lorafit checkpoint state (no integer 'step')")
        path = folder / "trainable.safetensors"
        try:
            trainable = load(path.read_bytes())
        except (OSError, SafetensorError) as e:
            raise LorafitError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
        path = folder / "training_state.pt"
        try:
            # Only tensors, dicts and numbers: loads with weights_only=True (no pickled code).
            training_state = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
            raise LorafitError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
        if not isinstance(training_state, dict) or not {"optimizer", "scheduler", "torch_rng"} <= set(training_state):
            raise LorafitError(f"{path}: not a lorafit training state (optimizer, scheduler and RNG expected)")
        return trainable, training_state, state


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a torn or foreign line: dropped with the evaluations after the checkpoint


def find_run(path: str | Path) -> RunDir:
    """A finished run directory given by path, or a clear error."""
    run = RunDir(Path(path))
    if not (run.path / CONFIG).exists():
        raise LorafitError(f"{run.path}: not a lorafit run directory (no {CONFIG})")
    return run
