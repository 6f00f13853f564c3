"""The run directory: what a training run leaves on disk, and its resumable checkpoint.

    <run>/config.yaml        the resolved TrainConfig
    <run>/metrics.jsonl      one line per evaluation
    <run>/train_loss.jsonl   the training loss every --log-steps optimizer steps
    <run>/summary.json       best metric and epoch, parameter counts, time, speed, memory
    <run>/adapter/           the best adapter, PEFT format (LoRA runs)
    <run>/model/             the best model, save_pretrained format (full fine-tuning runs)
    <run>/checkpoint/        the latest training state, for --resume

:class:`RunDir` is the one owner of this format: everything else in lorafit (the sweep, the
report, ``lorafit eval``) reads a run through it. Every file is written atomically (metrics.jsonl
is appended to, a line at a time); the checkpoint folder is swapped in whole, so a crash at any
moment leaves the previous checkpoint usable.

Where training stands (:class:`lorafit.progress.Progress`) and the summary a run ends with are
built in :mod:`lorafit.progress`; this module only reads and writes them.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lorafit.config import FIELD_NAMES, RUNTIME_KEYS, TrainConfig, field_defaults
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

if TYPE_CHECKING:  # torch and the model code load only when a run trains: the report needs neither
    import torch


SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAIN_LOSS = "train_loss.jsonl"
CHECKPOINT = "checkpoint"
# Any of these makes a folder a run directory (a run killed early may have only some).
RUN_FILES = (CONFIG, SUMMARY, METRICS, TRAIN_LOSS, CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.new")
# What a run writes; --overwrite removes exactly these, and nothing else in the folder.
OWNED = (*RUN_FILES, "adapter", "model", *(f"{n}.{s}" for n in ("adapter", "model") for s in ("old", "new")))


@dataclass
class RunDir:
    """A run directory on disk: where each file goes, and how each is read and written."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    # -- reading ---------------------------------------------------------------------------

    def is_run_dir(self) -> bool:
        """Whether the folder holds (part of) a run: a config, summary, metrics or checkpoint."""
        return any((self.path / name).exists() for name in RUN_FILES)

    def config(self) -> dict[str, Any]:
        """The resolved settings of the run (``config.yaml``) as written, a mapping of field names."""
        path = self.path / CONFIG
        if not path.exists():
            raise LorafitError(f"{self.path}: not a lorafit run directory (no {CONFIG})")
        return read_yaml_mapping(path, "run config")  # unreadable, not YAML or not a mapping: named

    def train_config(self) -> TrainConfig:
        """The run's settings as a :class:`TrainConfig` (refusing keys TrainConfig does not have)."""
        saved = self.config()
        unknown = sorted(set(saved) - FIELD_NAMES)
        if unknown:
            raise LorafitError(f"{self.path / CONFIG}: not a lorafit run config (unknown keys: {', '.join(unknown)})")
        try:
            return TrainConfig(**saved)
        except LorafitError as e:
            raise LorafitError(f"{self.path / CONFIG}: {e}") from None

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or None while there is none (or it is unreadable)."""
        try:
            data = json.loads((self.path / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def metrics(self) -> list[dict[str, Any]]:
        """The evaluations in ``metrics.jsonl``, by step; a step logged twice (a run resumed from
        an earlier checkpoint) counts once, with its last line; a line cut short by a kill is skipped."""
        records = []
        path = self.path / METRICS
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "step" in record:
                    records.append(record)
        by_step = {r["step"]: r for r in records}
        return [by_step[s] for s in sorted(by_step)]

    def is_finished(self) -> bool:
        summary = self.summary()
        return summary is not None and summary.get("status") == "finished"

    def has_checkpoint(self) -> bool:
        return self._checkpoint_folder() is not None

    def checkpoint_step(self) -> int | None:
        """The optimizer step the checkpoint was taken at, or None."""
        folder = self._checkpoint_folder()
        try:
            return read_json(folder / "state.json").get("step") if folder else None
        except LorafitError:
            return None

    def _checkpoint_folder(self) -> Path | None:
        for folder in (self.checkpoint, self.path / f"{CHECKPOINT}.old"):  # .old: crashed between two renames
            if (folder / "state.json").exists():
                return folder
        return None

    # -- writing ---------------------------------------------------------------------------

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a directory that --overwrite/--resume do not allow; writes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise LorafitError(f"--output-dir {self.path}: exists and is not a directory")
        if cfg.resume:
            if not self.has_checkpoint():
                raise LorafitError(f"--resume: {self.path} has no checkpoint to resume from")
            changed = self.changed_settings(cfg)
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

    def changed_settings(self, cfg: TrainConfig) -> list[str]:
        """Settings of ``cfg`` that differ from the run's config.yaml, leaving out how a run is
        executed (the fields tagged RUNTIME, which may change on --resume)."""
        saved = self.config()
        defaults = {**field_defaults(), "precision": self.recorded_precision()}
        # A run saved before a field existed ran with that field's default; "auto" precision
        # continues in the precision the run recorded (see recorded_precision).
        return sorted(k for k, v in cfg.to_dict().items()
                      if k not in RUNTIME_KEYS and saved.get(k, defaults[k]) != v
                      and not (k == "precision" and v == "auto"))

    def recorded_precision(self) -> str:
        """The precision the run trained in: config.yaml records what ``auto`` resolved to.

        A config without the key predates the field, when every run trained in fp32 (the
        default was fp32 until ``auto`` replaced it).
        """
        return str(self.config().get("precision", "fp32"))

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
        _drop_lines_after(self.path / METRICS, step)

    def append_train_loss(self, record: dict[str, Any]) -> None:
        # A plain append: append_line's atomic rewrite would cost O(lines) at every log step.
        with open(self.path / TRAIN_LOSS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def trim_train_loss(self, step: int) -> None:
        """Drop the loss lines after ``step`` (a resumed run trains those steps again)."""
        _drop_lines_after(self.path / TRAIN_LOSS, step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    # -- checkpoint ---------------------------------------------------------------------------

    def save_checkpoint(
        self, trainable: dict[str, torch.Tensor], training_state: dict[str, Any], state: dict[str, Any]
    ) -> None:
        """Write the checkpoint into ``checkpoint.new/`` and swap it in (the old one stays on failure)."""
        import io

        import torch
        from safetensors.torch import save

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
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load

        folder = self._checkpoint_folder() or self.checkpoint
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


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrite a JSON-lines log without the lines recorded after ``step`` (atomically, only if any)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a torn or foreign line: dropped with the evaluations after the checkpoint
