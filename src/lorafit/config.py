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
from lorafit.validation import FieldError, check_fields, coerce_numbers, flag_name

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
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        flag = flag_name
        # Types first (finite floats included), so the range checks below compare numbers.
        check_fields(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)})

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not allow_zero)):
                raise FieldError(name, f"{flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("rank", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_steps", "max_steps",
                     "eval_steps", "save_steps", "max_train_samples", "max_eval_samples", "num_threads", "alpha",
                     "learning_rate", "epochs"):
            positive(name)
        for name in ("weight_decay", "max_grad_norm"):
            positive(name, allow_zero=True)
        for name in ("lora_dropout", "warmup_ratio", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise FieldError(name, f"{flag(name)} must be in [0, 1), got {value!r}")
        for name in ("seed", "seeds"):  # numpy and torch take seeds in [0, 2**32)
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if value is not None and not 0 <= value < 2**32:
                    raise FieldError(name, f"{flag(name)} must be in [0, 2**32), got {value!r}")
        for name, allowed in (("method", ("lora", "full")), ("precision", ("fp32", "bf16", "fp16")),
                              ("task_type", ("classification", "regression"))):
            if getattr(self, name) not in allowed:
                raise FieldError(name, f"{flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.method == "full" and self.init_adapter:
            raise LorafitError("--init-adapter applies to --method lora, not full fine-tuning")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and (not value or not all(v for v in value)):
                raise FieldError(name, f"{flag(name)} must be a non-empty list of module names, got {value!r}")
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
RUNTIME_KEYS = {"output_dir", "overwrite", "resume", "progress", "num_threads"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of TrainConfig field names to values, each of its field's type."""
    from lorafit.recipes import find_recipe

    path = find_recipe(path)
    data = read_yaml_mapping(path, "a recipe")
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise LorafitError(f"{path}: unknown key(s) {', '.join(unknown)} (known: see `lorafit train --help`)")
    for key in ("target_modules", "modules_to_save", "text_columns"):
        if isinstance(data.get(key), str):
            data[key] = [s.strip() for s in data[key].split(",") if s.strip()]
    data = coerce_numbers(TrainConfig, data)
    check_fields(TrainConfig, data, name=lambda field: f"{path}: field '{field}'")
    return data


def make_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A validated config from a recipe (optional) with overrides on top.

    A value that breaks a rule is reported with the recipe's path when it came from the recipe.
    """
    from lorafit.recipes import find_recipe

    from_recipe: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values = coerce_numbers(TrainConfig, {**from_recipe, **overrides})
    try:
        return TrainConfig(**values)
    except FieldError as e:
        if e.field in from_recipe and e.field not in overrides:
            raise FieldError(e.field, f"{find_recipe(recipe)}: field '{e.field}': {e}") from None
        raise
