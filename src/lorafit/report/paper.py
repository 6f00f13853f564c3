"""The paper's numbers: the RoBERTa-base rows of Table 2 of Hu et al. (2022), data and not code."""

from __future__ import annotations

from dataclasses import dataclass

PAPER_SOURCE = "Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022), Table 2"
PAPER_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 2 (GLUE dev set, in %): median over 5 seeds for LoRA."""

    label: str
    method: str
    trainable: str  # as printed in the paper (head excluded)
    values: dict[str, float]
    spread: dict[str, float] | None  # the paper's "±" (None: a single number, copied from prior work)
    average: float  # the paper's Avg over its 8 tasks


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(
        "RoB-base FT*", "full", "125.0M",
        dict(zip(PAPER_TASKS, (87.6, 94.8, 90.2, 63.6, 92.8, 91.9, 78.7, 91.2))), None, 86.4,
    ),
    PaperRow(
        "RoB-base LoRA", "lora", "0.3M",
        dict(zip(PAPER_TASKS, (87.5, 95.1, 89.7, 63.4, 93.3, 90.8, 86.6, 91.5))),
        dict(zip(PAPER_TASKS, (0.3, 0.2, 0.7, 1.2, 0.3, 0.1, 0.7, 0.2))), 87.2,
    ),
)
