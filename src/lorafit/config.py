"""The training configuration: one typed dataclass that validates itself.

The CLI flags of ``lorafit train`` are derived from these fields (``learning_rate`` becomes
``--learning-rate``), and YAML recipes use the same names as keys, so there is one place for
every default and every rule. What kind of setting a field is (a LoRA-only setting, how a run is
executed, ...) is data on the field too: see the tags below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorafit.errors import LorafitError
from lorafit.flags import flag_name, split_commas
from lorafit.io import read_yaml_mapping
from lorafit.validation import FieldError, check_fields, coerce_numbers

if TYPE_CHECKING:
    from lorafit.data import TaskSpec
    from lorafit.lora.config import LoRAConfig

Method = Literal["lora", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "step-graph"]
InitLoRAWeights = Literal["default", "gaussian", "pissa"]  # PEFT's names ("default" is its True)

# Field tags (a field may carry several; an untagged field is an ordinary training setting).
# How a run is executed, not what it learns: may change on --resume, never taken from a recipe,
# not a sweep axis, and runs that differ only here are one configuration in a report.
RUNTIME = "runtime"
# Set for each run by `--seeds` and by the sweep (where the run goes, whether it resumes).
PER_RUN = "per_run"
# Read only when method is "lora"; full fine-tuning sweep cells get their defaults.
LORA = "lora"
# The random seed: runs that differ only here are repeats of one configuration.
SEED = "seed"
# An instruction to one invocation, not a setting of the run: left out of a run's `lorafit train` command.
ONE_OFF = "one_off"


def _help(text: str, *tags: str) -> dict[str, Any]:
    """A field's metadata: its ``--help`` text and its tags (see above)."""
    return {"help": text, "tags": frozenset(tags)}


@dataclass
class TrainConfig:
    """Everything one training run needs. Field docs double as ``--help`` text.

    A new field is one line: ``name: type = field(default=..., metadata=_help("help text", *tags))``,
    with the tags that apply (``LORA``, ``RUNTIME``, ``PER_RUN``, ``SEED``, ``ONE_OFF``, defined
    above). The lists the rest of lorafit uses (what may change on ``--resume``, what a sweep sets,
    what full fine-tuning ignores, what a report compares) are derived from the tags; a LoRA
    setting is also passed on in :meth:`lora_config`.
    """

    # What to train.
    task: str = field(default="mrpc", metadata=_help("GLUE task (sst2, mrpc, rte, cola, stsb, qnli, qqp, mnli) or a name for custom data"))
    model: str = field(default="minilm", metadata=_help("'minilm' (the embedded all-MiniLM-L6-v2), a local model folder, or a Hub id"))
    method: Method = field(default="lora", metadata=_help("'lora' (frozen base + low-rank adapters + trained head) or 'full' fine-tuning"))
    # LoRA.
    rank: int = field(default=8, metadata=_help("LoRA rank r", LORA))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha; updates are scaled by alpha/r (the paper's scripts use 16 for RoBERTa)", LORA))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA branch input", LORA))
    target_modules: list[str] | None = field(default=None, metadata=_help("comma-separated module names to adapt (default: the architecture's query,value)", LORA))
    use_rslora: bool = field(default=False, metadata=_help("scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r", LORA))
    use_dora: bool = field(default=False, metadata=_help("DoRA: a trained magnitude per output row on top of the low-rank direction (saved as PEFT's lora_magnitude_vector)", LORA))
    init_lora_weights: InitLoRAWeights = field(default="default", metadata=_help("how A and B start: default (A Kaiming-uniform, B zero), gaussian (A ~ N(0, 1/r)), pissa (top-r singular vectors of the base weight)", LORA))
    loraplus_lr_ratio: float | None = field(default=None, metadata=_help("LoRA+: the B matrices learn at this multiple of the learning rate (the paper suggests about 16); A, DoRA magnitudes and the head at the base rate", LORA))
    modules_to_save: list[str] | None = field(default=None, metadata=_help("comma-separated modules trained in full and saved with the adapter (default: the architecture's head: classifier; DeBERTa also pooler)", LORA))
    head_learning_rate: float | None = field(default=None, metadata=_help("peak learning rate of the trained head (--modules-to-save) under LoRA (default: --learning-rate)", LORA))
    init_adapter: str | None = field(default=None, metadata=_help("start from this adapter (the paper starts MRPC, RTE and STS-B from the MNLI adapter)", LORA))
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
    precision: Precision = field(default="auto", metadata=_help("auto (bf16 where the CPU has AMX or AVX-512 BF16 or the GPU supports bf16, else fp32; the run's config.yaml records which), fp32, bf16 (autocast; CPU or GPU) or fp16 (GPU only)"))
    seed: int = field(default=0, metadata=_help("random seed", SEED))
    seeds: list[int] | None = field(default=None, metadata=_help("comma-separated seeds: one run each, and the median (as in the paper)", SEED, PER_RUN, ONE_OFF))
    # Speed (see docs/performance.md; `lorafit bench` measures each).
    frozen_bf16: bool | None = field(default=None, metadata=_help("store the frozen base weights in bf16, LoRA and head in fp32 (default: on when LoRA trains in bf16)"))
    compile: bool = field(default=False, metadata=_help("torch.compile the model (batches padded to --length-buckets so shapes are few)"))
    compile_mode: CompileMode = field(default="auto", metadata=_help("torch.compile mode; auto: reduce-overhead (CUDA graphs of the forward and backward) on a GPU, default on a CPU; step-graph (GPU, one process): inductor's kernels, and each whole step, forward to AdamW, captured as one CUDA graph per batch shape"))
    length_buckets: list[int] | None = field(default=None, metadata=_help("pad each batch up to the next of these lengths (default with --compile: 16,32,48,64,96,128,... up to --max-length)"))
    fused_optimizer: bool = field(default=True, metadata=_help("one fused AdamW kernel for all trainable parameters (else a per-tensor loop)"))
    fast_dropout: bool = field(default=False, metadata=_help("draw CPU dropout masks, attention probabilities' included, from 16-bit random integers at about a third of torch's cost, and run training attention in autocast's dtype instead of SDPA's fp32 math path (a different random stream: a run with it does not repeat one without it bit for bit)"))
    vectorised_masks: bool = field(default=True, metadata=_help("on a CPU, draw PyTorch's own dropout masks (the same Mersenne-Twister numbers, bit for bit) with a vectorised kernel instead of PyTorch's one-number-at-a-time loop, where Numba is installed, written straight as dropout's scaled noise, and run SDPA's math path op for op without its masked-row checks: MRPC training measured 1.58x as fast; changes no result", RUNTIME))
    cls_only_last_layer: bool = field(default=True, metadata=_help("in training, the last encoder layer computes past its attention only the first token's row ([CLS]), the one the classification head reads (BERT, RoBERTa, ELECTRA, DeBERTa-v2), and on a CPU asks its attention with that token's query alone (BERT, RoBERTa, ELECTRA), with the same dropout masks: the same loss and gradients to rounding, about a seventh less matrix work for the embedded model, MRPC steps 1.13x; evaluation runs the full layer", RUNTIME))
    reuse_memory: bool = field(default=False, metadata=_help("on a CPU, keep freed memory in the process for the next step's tensors (glibc's malloc) instead of faulting it in from the kernel again (MRPC steps measured 3 to 10 in 100 faster, whole runs through lorafit bench about 1 in 100); the process's memory stays near its peak; nothing on tcmalloc, which keeps freed memory itself", RUNTIME))
    allocator: Literal["auto", "system", "tcmalloc", "jemalloc"] = field(default="auto", metadata=_help("the malloc the process runs on; the lorafit command starts itself again with it preloaded. auto: tcmalloc on a Linux CPU where it is installed (MRPC training measured 1.25x as fast as on glibc's through lorafit bench), else the system's", RUNTIME))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("auto (a GPU when there is one), cpu or cuda", RUNTIME))
    # Data.
    max_length: int = field(default=128, metadata=_help("truncate inputs to this many tokens (padding is dynamic)"))
    eval_batch_size: int = field(default=64, metadata=_help("examples per evaluation batch", RUNTIME))
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
    output_dir: str | None = field(default=None, metadata=_help("run directory (default: runs/<task>-<method>-...)", RUNTIME, PER_RUN))
    overwrite: bool = field(default=False, metadata=_help("replace a finished run in output_dir", RUNTIME, PER_RUN, ONE_OFF))
    resume: bool = field(default=False, metadata=_help("continue from the checkpoint in output_dir", RUNTIME, PER_RUN, ONE_OFF))
    eval_steps: int | None = field(default=None, metadata=_help("evaluate every N optimizer steps (default: every epoch)"))
    save_steps: int | None = field(default=200, metadata=_help("write a resumable checkpoint every N optimizer steps (and at each evaluation)", RUNTIME))
    log_steps: int = field(default=20, metadata=_help("update the progress bar's loss every N steps", RUNTIME))
    num_threads: int | None = field(default=None, metadata=_help("CPU threads for torch (default: torch's choice)", RUNTIME))
    trust_remote_code: bool = field(default=False, metadata=_help("allow model code from the Hub (off unless asked for)"))
    progress: bool = field(default=True, metadata=_help("show progress bars", RUNTIME, ONE_OFF))
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = field(default="none", metadata=_help("log loss, learning rate, speed and dev metrics to this tracker (through Accelerate); tensorboard writes <run>/tensorboard/", RUNTIME))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        flag = flag_name
        for name in ("target_modules", "modules_to_save"):  # a list here; LoRAConfig also takes a regex
            if getattr(self, name) is not None and not isinstance(getattr(self, name), list):
                raise FieldError(name, f"{flag(name)} must be a non-empty list of module names, got {getattr(self, name)!r}")
        # Types first (finite floats included), so the range checks below compare numbers.
        check_fields(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)})

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not allow_zero)):
                raise FieldError(name, f"{flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "log_steps", "max_steps",
                     "eval_steps", "save_steps", "max_train_samples", "max_eval_samples", "num_threads",
                     "learning_rate", "epochs"):
            positive(name)
        for name in ("weight_decay", "max_grad_norm"):
            positive(name, allow_zero=True)
        for name in ("warmup_ratio", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise FieldError(name, f"{flag(name)} must be in [0, 1), got {value!r}")
        for name in ("seed", "seeds"):  # numpy and torch take seeds in [0, 2**32)
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if value is not None and not 0 <= value < 2**32:
                    raise FieldError(name, f"{flag(name)} must be in [0, 2**32), got {value!r}")
        for name, allowed in (("method", ("lora", "full")), ("precision", ("auto", "fp32", "bf16", "fp16")),
                              ("task_type", ("classification", "regression")),
                              ("compile_mode", ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "step-graph")),
                              ("device", ("auto", "cpu", "cuda")),
                              ("report_to", ("none", "tensorboard", "wandb", "mlflow"))):
            if getattr(self, name) not in allowed:
                raise FieldError(name, f"{flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.method == "full" and self.init_adapter:
            raise LorafitError("--init-adapter applies to --method lora, not full fine-tuning")
        if self.method == "full" and self.head_learning_rate is not None:
            raise LorafitError("--head-learning-rate applies to --method lora (full fine-tuning trains every "
                               "weight at --learning-rate)")
        positive("loraplus_lr_ratio")
        positive("head_learning_rate")
        if self.init_adapter and self.init_lora_weights == "pissa":
            raise LorafitError("--init-adapter replaces the LoRA factors that --init-lora-weights pissa takes from "
                               "the base weight; give one")
        for name in ("target_modules", "modules_to_save"):  # a list here; LoRAConfig also takes a regex
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (list, tuple)):
                raise LorafitError(f"{flag(name)} must be a non-empty list of module names, got {getattr(self, name)!r}")
        if self.length_buckets is not None and (
            not self.length_buckets
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in self.length_buckets)
        ):
            raise LorafitError(f"--length-buckets must be positive integers, got {self.length_buckets!r}")
        if self.length_buckets and max(self.length_buckets) > self.max_length:
            # Examples are cut to --max-length, so a longer bucket only pads (past the position embeddings, even).
            raise LorafitError(f"--length-buckets must be at most --max-length {self.max_length}, no batch is "
                               f"longer; got {self.length_buckets!r}")
        if self.frozen_bf16 is not None and not isinstance(self.frozen_bf16, bool):
            raise LorafitError(f"--frozen-bf16 must be true or false, got {self.frozen_bf16!r}")

        from lorafit.lora.config import LoRAConfigError  # here: `lorafit --help` need not import torch

        try:  # the LoRA fields are checked by LoRAConfig, the one owner of those rules
            self.lora_config()
        except LoRAConfigError as e:
            name = LORA_FIELDS[e.field]
            raise FieldError(name, f"{flag(name)} {e.rule}, got {e.value!r}") from None
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

    def lora_config(self) -> LoRAConfig:
        """The LoRA settings of this run (architecture defaults still unresolved)."""
        from lorafit.lora.config import LoRAConfig

        return LoRAConfig(r=self.rank, alpha=self.alpha, dropout=self.lora_dropout, target_modules=self.target_modules,
                          modules_to_save=self.modules_to_save, use_rslora=self.use_rslora, use_dora=self.use_dora,
                          init_lora_weights=self.init_lora_weights)

    def task_spec(self) -> TaskSpec:
        """The GLUE task named by ``task``, or the user's task when custom files are given."""
        from lorafit.data import TASKS, custom_task, get_task

        if self.train_file:
            # A GLUE name (the default "mrpc" included) would mislabel the user's data.
            name = "custom" if self.task.lower().replace("-", "") in TASKS else self.task
            return custom_task(self.train_file, self.text_columns or ["text"], self.label_column,
                               name=name, regression=self.task_type == "regression")
        return get_task(self.task)

    def run_name(self) -> str:
        lora = f"-r{self.rank}" if self.method == "lora" else ""
        return f"{self.task}-{self.method}{lora}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# LoRAConfig field -> the TrainConfig field (and so the flag) that sets it.
LORA_FIELDS = {"r": "rank", "alpha": "alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
               "modules_to_save": "modules_to_save", "use_rslora": "use_rslora", "use_dora": "use_dora",
               "init_lora_weights": "init_lora_weights"}
FIELD_ORDER: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))
FIELD_NAMES = set(FIELD_ORDER)


def field_defaults() -> dict[str, Any]:
    """Every field's default, in field order (without building, and so validating, a TrainConfig)."""
    return {f.name: f.default for f in fields(TrainConfig)}


def fields_tagged(*tags: str) -> frozenset[str]:
    """Names of the TrainConfig fields carrying any of ``tags``."""
    return frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("tags", frozenset()) & set(tags))


# How a run is executed, not what it trains: may change on --resume, never taken from a recipe.
RUNTIME_KEYS = fields_tagged(RUNTIME)
# Set by the sweep for each cell (and by --seeds for each run), never by a grid.
PER_RUN_KEYS = fields_tagged(PER_RUN)
# Only read by method "lora", in field order.
LORA_ONLY = tuple(name for name in FIELD_ORDER if name in fields_tagged(LORA))
# Not what a run learns: runs that differ only in these are seeds of one configuration.
NOT_SETTINGS = fields_tagged(RUNTIME, SEED)
# Left out of the `lorafit train` command that reproduces a run.
ONE_OFF_KEYS = fields_tagged(ONE_OFF)


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
            data[key] = split_commas(data[key])
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
