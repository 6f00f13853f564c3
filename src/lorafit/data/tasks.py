"""The GLUE task registry, kept as plain data.

Each task is a frozen :class:`TaskSpec`; nothing else in lorafit branches on a task's name.
(The task of user files is built by :func:`lorafit.data.custom.custom_task`.)
Column names and label orders follow the Hugging Face ``nyu-mll/glue`` configs, so a model
trained here uses the same label ids as one trained on the hub copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafit.errors import LorafitError

__all__ = ["TASKS", "TaskSpec", "get_task"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything lorafit needs to know about one task.

    Attributes:
        name: Canonical lowercase name (the Hugging Face GLUE config name, e.g. ``"sst2"``).
        glue_dir: Folder name in the GLUE layout (``"SST-2"``), or ``None`` for a custom task.
        text_fields: One or two text column names (Hugging Face names for GLUE tasks).
        label_names: Class names in label-id order, or ``None`` for a regression task.
        metric: The metric key used to pick the best epoch.
        metrics: Every metric reported for the task.
        eval_splits: The evaluation split names (MNLI has two).
    """

    name: str
    glue_dir: str | None
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metric: str
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)

    def __post_init__(self) -> None:
        # These are programming errors in the registry or in custom_task's caller, not bad
        # user files, so they stay plain ValueErrors.
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"task {self.name!r}: expected 1 or 2 text fields, got {self.text_fields!r}")
        if self.label_names is not None and len(self.label_names) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least 2 labels")
        if self.metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not in metrics {self.metrics!r}")

    @property
    def is_regression(self) -> bool:
        """True when the task predicts one real-valued score (STS-B)."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Size of the classification head: the number of classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", "SST-2", ("sentence",), ("negative", "positive"), "accuracy", ("accuracy",)),
        TaskSpec(
            "mrpc",
            "MRPC",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            "accuracy",
            ("accuracy", "f1"),
        ),
        TaskSpec(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            ("entailment", "not_entailment"),
            "accuracy",
            ("accuracy",),
        ),
        TaskSpec(
            "cola",
            "CoLA",
            ("sentence",),
            ("unacceptable", "acceptable"),
            "matthews_correlation",
            ("accuracy", "matthews_correlation"),
        ),
        TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), None, "pearson", ("pearson", "spearmanr")),
        TaskSpec(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            ("entailment", "not_entailment"),
            "accuracy",
            ("accuracy",),
        ),
        TaskSpec(
            "qqp",
            "QQP",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            "accuracy",
            ("accuracy", "f1"),
        ),
        # "accuracy" for MNLI is computed over matched + mismatched together, as in the
        # caption of Table 2 of the LoRA paper; the per-split values are reported as well.
        TaskSpec(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            "accuracy",
            ("accuracy",),
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
    )
}


def _normalize(name: str) -> str:
    # "SST-2", "sst_2", "STS-B", "glue/mrpc" all reduce to the HF config name.
    name = name.strip().lower()
    name = name.removeprefix("glue/")
    return re.sub(r"[-_\s]", "", name)


def get_task(name: str) -> TaskSpec:
    """Look up a GLUE task by any common spelling (``"SST-2"``, ``"sst2"``, ``"STS-B"``...).

    Raises:
        LorafitError: if the name is not one of the eight GLUE tasks lorafit supports.
    """
    spec = TASKS.get(_normalize(name))
    if spec is None:
        known = ", ".join(f"{s.name} ({s.glue_dir})" for s in TASKS.values())
        raise LorafitError(f"task: unknown task {name!r}; known tasks: {known}")
    return spec
