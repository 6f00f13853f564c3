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

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from lorafit.config import RUNTIME_KEYS, TrainConfig
from lorafit.errors import LorafitError
from lorafit.io import atomic_write_bytes, atomic_write_json, read_json

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"


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
            saved = yaml.safe_load((self.path / CONFIG).read_text())
            # A run saved before a field existed ran with that field's default.
            defaults = TrainConfig.__dataclass_fields__
            changed = {k for k, v in cfg.to_dict().items()
                       if k not in RUNTIME_KEYS and saved.get(k, defaults[k].default) != v}
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

    def start(self, cfg: TrainConfig) -> None:
        """Clear what --overwrite replaces and write the resolved config (called once the model
        and data have loaded, so bad input leaves no half-made run behind)."""
        if cfg.resume:
            return
        if self.path.exists() and cfg.overwrite:
            for name in (SUMMARY, METRICS, CONFIG, "adapter", "model", CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.new"):
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    # -- checkpoint ---------------------------------------------------------------------------

    def save_checkpoint(
        self, trainable: dict[str, torch.Tensor], training_state: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Write the checkpoint into ``checkpoint.new/`` and swap it in."""
        new, old = self.path / f"{CHECKPOINT}.new", self.path / f"{CHECKPOINT}.old"
        if new.exists():
            shutil.rmtree(new)
        new.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, new / "trainable.safetensors")
        torch.save(training_state, new / "training_state.pt")
        atomic_write_json(new / "state.json", state)
        if self.checkpoint.exists():
            if old.exists():
                shutil.rmtree(old)
            self.checkpoint.rename(old)
        new.rename(self.checkpoint)
        if old.exists():
            shutil.rmtree(old)

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        folder = self.checkpoint
        if not (folder / "state.json").exists():  # crashed between the two renames
            folder = self.path / f"{CHECKPOINT}.old"
        state = read_json(folder / "state.json", "checkpoint state")
        trainable = load_file(folder / "trainable.safetensors")
        # Only tensors, dicts and numbers: loads with weights_only=True (no pickled code).
        training_state = torch.load(folder / "training_state.pt", weights_only=True)
        return trainable, training_state, state


def find_run(path: str | Path) -> RunDir:
    """A finished run directory given by path, or a clear error."""
    run = RunDir(Path(path))
    if not (run.path / CONFIG).exists():
        raise LorafitError(f"{run.path}: not a lorafit run directory (no {CONFIG})")
    return run
