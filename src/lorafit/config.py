"""The training configuration: one typed dataclass that validates itself.

The CLI flags of ``lorafit train`` are derived from these fields (``learning_rate`` becomes
``--learning-rate``), and YAML recipes use the same names as keys, so there is one place for
every default and every rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


from lorafit.errors import LorafitError
from lorafit.io import read_yaml_mapping

Method = Literal["lora", "full"]
Precision = Literal["fp32", "bf16", "fp16"]


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Everything one training run needs. Field docs double as ``--help`` text."""

    # What to train.
    task: str = field(default="mrpc", metadata=_help("GLUE task (sst2, mrpc, rte, cola, stsb, qnli, qqp, mnli) or a name for custom data"))
    model: str = field(default="minilm", metadata=_help("'minilm' (the embedded all-MiniLM-L6-v2), a local model folder, or a Hub id"))
    method: Method = field(default="lora", metadata=_help("'lora' (frozen base + low-rank adapters + trained head) or 'full' fine-tuning"))
    # LoRA.
    rank: int = field(default=8, metadata=_help("LoRA rank r"))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha; updates are scaled by alpha/r (the paper's scripts use 16 for RoBERTa)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA branch input"))
    target_modules: list[str] | None = field(default=None, metadata=_help("comma-separated module names to adapt (default: the architecture's query,value)"))
    use_rslora: bool = field(default=False, metadata=_help("scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r"))
    modules_to_save: list[str] | None = field(default=None, metadata=_help("comma-separated modules trained in full and saved with the adapter (default: the architecture's head: classifier; DeBERTa also pooler)"))
    init_adapter: str | None = field(default=None, metadata=_help("start from this adapter (the paper starts MRPC, RTE and STS-B from the MNLI adapter)"))
    # Optimisation.
    learning_rate: float = field(default=5e-4, metadata=_help("peak learning rate of AdamW"))
    batch_size: int = field(default=16, metadata=_help("examples per optimizer step (per device, before accumulation)"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches accumulated per optimizer step"))
    epochs: float = field(default=3.0, metadata=_help("training epochs (may be fractional)"))
    max_steps: int | None = field(default=None, metadata=_help("stop after this many optimizer steps (overrides epochs)"))
    warmup_ratio: float = field(default=0.06, metadata=_help("fraction of steps with linear warm-up; then linear decay to 0"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (not applied to biases and LayerNorm)"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0 disables)"))
    classifier_dropout: float | None = field(default=None, metadata=_help("dropout before the classifier (default: the model's)"))
    precision: Precision = field(default="fp32", metadata=_help("fp32, bf16 (autocast; CPU or GPU) or fp16 (GPU only)"))
    seed: int = field(default=0, metadata=_help("random seed"))
    seeds: list[int] | None = field(default=None, metadata=_help("comma-separated seeds: one run each, and the median (as in the paper)"))
    # Data.
    max_length: int = field(default=128, metadata=_help("truncate inputs to this many tokens (padding is dynamic)"))
    eval_batch_size: int = field(default=64, metadata=_help("examples per evaluation batch"))
    group_by_length: bool = field(default=True, metadata=_help("batch examples of similar length (less padding)"))
    max_train_samples: int | None = field(default=None, metadata=_help("use only the first N training examples (after a seeded shuffle)"))
    max_eval_samples: int | None = field(default=None, metadata=_help("evaluate on only the first N examples of each dev set"))
    data_dir: str | None = field(default=None, metadata=_help("folder in the standard GLUE layout (DIR/SST-2/train.tsv, ...)"))
    train_file: str | None = field(default=None, metadata=_help("custom training data (.csv, .tsv or .jsonl)"))
    validation_file: str | None = field(default=None, metadata=_help("custom dev data (.csv, .tsv or .jsonl)"))
    text_columns: list[str] | None = field(default=None, metadata=_help("custom data: comma-separated text column(s), one or two"))
    label_column: str = field(default="label", metadata=_help("custom data: the label column"))
    task_type: Literal["classification", "regression"] = field(default="classification", metadata=_help("custom data: classification or regression"))
    # Run directory, evaluation and checkpoints.
    output_dir: str | None = field(default=None, metadata=_help("run directory (default: runs/<task>-<method>-...)"))
    overwrite: bool = field(default=False, metadata=_help("replace a finished run in output_dir"))
    resume: bool = field(default=False, metadata=_help("continue from the checkpoint in output_dir"))
    eval_steps: int | None = field(default=None, metadata=_help("evaluate every N optimizer steps (default: every epoch)"))
    save_steps: int | None = field(default=200, metadata=_help("write a resumable checkpoint every N optimizer steps (and at each evaluation)"))
    log_steps: int = field(default=20, metadata=_help("update the progress bar's loss every N steps"))
    num_threads: int | None = field(default=None, metadata=_help("CPU threads for torch (default: torch's choice)"))
    trust_remote_code: bool = field(default=False, metadata=_help("allow model code from the Hub (off unless asked for)"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = field(default="none", metadata=_help("log loss, learning rate, speed and dev metrics to this tracker (through Accelerate); tensorboard writes <run>/tensorboard/"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def positive(name: str, allow_zero: bool = False, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LorafitError(f"{flag(name)} must be a number, got {value!r}")
            if value < 0 or (value == 0 and not allow_zero):
                raise LorafitError(f"{flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("rank", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise LorafitError(f"{flag(name)} must be an integer, got {getattr(self, name)!r}")
            positive(name)
        for name in ("max_steps", "eval_steps", "save_steps", "max_train_samples", "max_eval_samples", "num_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise LorafitError(f"{flag(name)} must be an integer, got {value!r}")
            positive(name, optional=True)
        for name in ("alpha", "learning_rate", "epochs"):
            positive(name)
        for name in ("weight_decay", "max_grad_norm"):
            positive(name, allow_zero=True)
        for name in ("lora_dropout", "warmup_ratio", "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise LorafitError(f"{flag(name)} must be in [0, 1), got {value!r}")
        for name, allowed in (("method", ("lora", "full")), ("precision", ("fp32", "bf16", "fp16")),
                              ("task_type", ("classification", "regression")),
                              ("report_to", ("none", "tensorboard", "wandb", "mlflow"))):
            if getattr(self, name) not in allowed:
                raise LorafitError(f"{flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.method == "full" and self.init_adapter:
            raise LorafitError("--init-adapter applies to --method lora, not full fine-tuning")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and (not value or not all(isinstance(v, str) and v for v in value)):
                raise LorafitError(f"{flag(name)} must be a non-empty list of module names, got {value!r}")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise LorafitError(f"--text-columns takes one or two column names, got {self.text_columns!r}")
        if (self.train_file is None) != (self.validation_file is None):
            raise LorafitError("custom data needs both --train-file and --validation-file")
        if self.train_file and self.data_dir:
            raise LorafitError("--data-dir and --train-file are two data sources; give one")
        if self.resume and self.overwrite:
            raise LorafitError("--resume continues a run and --overwrite replaces it; give one")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise LorafitError(f"--seeds must be distinct integers, got {self.seeds!r}")

    def run_name(self) -> str:
        lora = f"-r{self.rank}" if self.method == "lora" else ""
        return f"{self.task}-{self.method}{lora}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
# Keys that describe how a run is executed, not what is trained: never taken from a recipe.
RUNTIME_KEYS = {"output_dir", "overwrite", "resume", "progress", "num_threads", "report_to"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of TrainConfig field names to values."""
    from lorafit.recipes import find_recipe

    path = find_recipe(path)
    data = read_yaml_mapping(path, "a recipe")
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise LorafitError(f"{path}: unknown key(s) {', '.join(unknown)} (known: see `lorafit train --help`)")
    for key in ("target_modules", "modules_to_save", "text_columns"):
        if isinstance(data.get(key), str):
            data[key] = [s.strip() for s in data[key].split(",") if s.strip()]
    return data


def make_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A validated config from a recipe (optional) with overrides on top."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update(overrides)
    for key in ("alpha", "learning_rate", "epochs", "weight_decay", "warmup_ratio", "lora_dropout", "max_grad_norm"):
        if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
            values[key] = float(values[key])
    return TrainConfig(**values)
