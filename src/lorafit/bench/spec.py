"""What one bench measurement runs: the shared workload and the side (implementation + setting).

Both sides of a comparison get the same :class:`Workload` (task, examples, batch, epochs,
learning rate, seed, threads, max length, LoRA shape), so they do the same work; a
:class:`Side` only says who does it and how (``lorafit`` with its options, or ``peft``, the
Hugging Face Trainer + PEFT baseline, in fp32 or ``bf16=True``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lorafit.errors import LorafitError

IMPLEMENTATIONS = ("lorafit", "peft")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# lorafit options a side may switch on or off by name (``lorafit@bf16+compile-frozen_bf16``).
# LoRA's variants a lorafit side may turn on (``lorafit+dora``), so that one alternating bench
# measures what each costs against plain LoRA: the TrainConfig fields each switch sets.
VARIANT_SWITCHES: dict[str, dict[str, Any]] = {
    "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},  # the LoRA+ paper's suggested ratio
    "pissa": {"init_lora_weights": "pissa"},
}
# Switches that set more than their own field: ``+step_graph`` compiles and captures each whole
# training step as a CUDA graph (``--compile --compile-mode step-graph``).
COMPOUND_SWITCHES: dict[str, dict[str, Any]] = {"step_graph": {"compile": True, "compile_mode": "step-graph"}}
LORAFIT_SWITCHES = ("cls_only_last_layer", "compile", "fast_dropout", "frozen_bf16", "fused_optimizer", "group_by_length",
                    "reuse_memory", "vectorised_masks", *COMPOUND_SWITCHES, *VARIANT_SWITCHES)
# The baseline's one switch: the Trainer's own ``group_by_length`` (off by default, as a user who
# keeps the Trainer's defaults has it), so a comparison can also show the baseline with padding
# cut the way lorafit cuts it (``peft@bf16+group_by_length``).
PEFT_SWITCHES = ("group_by_length",)
# The process's malloc (lorafit.allocator), for either side: ``peft@bf16+tcmalloc`` runs the
# baseline on tcmalloc, ``lorafit-tcmalloc`` runs lorafit on the system's allocator. Unnamed,
# lorafit gets its default (``auto``) and the baseline the system's, as each would run for a user.
ALLOCATOR_SWITCHES = ("tcmalloc", "jemalloc")
SWITCHES = {"lorafit": LORAFIT_SWITCHES + ALLOCATOR_SWITCHES, "peft": PEFT_SWITCHES + ALLOCATOR_SWITCHES}


@dataclass(frozen=True)
class Side:
    """One implementation at one setting, written ``IMPL[@PRECISION][+OPTION|-OPTION...]``.

    ``lorafit`` alone means lorafit's defaults; ``peft@bf16`` is the baseline with
    ``bf16=True`` (``+group_by_length`` turns on the Trainer's length grouping);
    ``lorafit@bf16+compile`` turns ``--compile`` on, ``-frozen_bf16`` turns an option off.
    """

    impl: str
    precision: str | None = None  # None: the implementation's default
    options: tuple[tuple[str, bool], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Side:
        head, *switches = text.strip().replace("-", "+-").split("+")
        impl, _, precision = head.partition("@")
        if impl not in IMPLEMENTATIONS:
            raise LorafitError(f"--sides: {text!r}: implementation must be one of {', '.join(IMPLEMENTATIONS)}")
        if precision and precision not in PRECISIONS:
            raise LorafitError(f"--sides: {text!r}: precision must be one of {', '.join(PRECISIONS)}")
        options = []
        for s in filter(None, switches):
            name, on = (s[1:], False) if s.startswith("-") else (s, True)
            if name not in SWITCHES[impl]:
                raise LorafitError(f"--sides: {text!r}: unknown option {name!r} "
                                   f"({impl} options: {', '.join(SWITCHES[impl])})")
            if (name in VARIANT_SWITCHES or name in COMPOUND_SWITCHES) and not on:
                raise LorafitError(f"--sides: {text!r}: {name} is off unless turned on: write +{name}")
            options.append((name, on))
        return cls(impl, precision or None, tuple(options))

    @property
    def variant(self) -> str | None:
        """The LoRA variant this side turns on (``dora``, ...), None for plain LoRA."""
        return next((name for name, on in self.options if name in VARIANT_SWITCHES and on), None)

    @property
    def allocator(self) -> str:
        """The ``--allocator`` this side runs on, before :func:`lorafit.allocator.resolve`."""
        named = [(name, on) for name, on in self.options if name in ALLOCATOR_SWITCHES]
        if not named:
            return "auto" if self.impl == "lorafit" else "system"
        name, on = named[-1]
        return name if on else "system"

    @property
    def label(self) -> str:
        text = self.impl + (f"@{self.precision}" if self.precision else "")
        return text + "".join(("+" if on else "-") + name for name, on in self.options)


@dataclass
class Workload:
    """The work both sides do, identical for each."""

    task: str = "mrpc"
    model: str = "minilm"
    batch_size: int = 16
    epochs: float = 1.0
    learning_rate: float = 5e-4
    seed: int = 0
    threads: int | None = None  # None: physical cores
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_batch_size: int = 128
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.1
    device: str = "cpu"
    length_buckets: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields for lorafit

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def peak_memory(device: str) -> float:
    """Peak memory in GiB: max_memory_allocated on a GPU, the process's peak RSS on the CPU."""
    import torch

    from lorafit.hardware import peak_memory_gib

    return peak_memory_gib(torch.device("cuda" if device.startswith("cuda") else "cpu"))


def lorafit_config(work: Workload, side: Side, output_dir: str, **overrides: Any):
    """The TrainConfig for ``work`` done by lorafit at ``side``'s setting."""
    from lorafit.config import make_config

    values: dict[str, Any] = dict(
        task=work.task, model=work.model, batch_size=work.batch_size, epochs=work.epochs,
        learning_rate=work.learning_rate, seed=work.seed, num_threads=work.threads, max_length=work.max_length,
        max_train_samples=work.max_train_samples, max_eval_samples=work.max_eval_samples,
        eval_batch_size=work.eval_batch_size, rank=work.rank, alpha=work.alpha, lora_dropout=work.lora_dropout,
        output_dir=output_dir, progress=False, save_steps=None, device=work.device,
        eval_steps=10**9,  # evaluate once, after the last step, as the baseline does
        **work.extra,
    )
    if work.length_buckets:
        values["length_buckets"] = work.length_buckets
    if side.precision:
        values["precision"] = side.precision
    for name, on in side.options:
        if name not in ALLOCATOR_SWITCHES:
            values.update(VARIANT_SWITCHES.get(name) or COMPOUND_SWITCHES.get(name) or {name: on})
    values["allocator"] = side.allocator
    values.update(overrides)
    return make_config(**values)
