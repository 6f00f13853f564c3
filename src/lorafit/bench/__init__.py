"""``lorafit bench``: lorafit against Hugging Face Trainer + PEFT, side by side, alternating.

Modes ``train`` (throughput, memory, dev metric, % of the measured matmul peak), ``infer``
(latency of the base model, LoRA unmerged and merged) and ``memory`` (LoRA vs full
fine-tuning). Every record carries the hardware, threads, versions and exact settings.
"""

from lorafit.bench.runner import run_bench
from lorafit.bench.spec import Side, Workload
from lorafit.bench.summary import format_table, summarize

__all__ = ["Side", "Workload", "format_table", "run_bench", "summarize"]
