"""Hand-written run directories for the report's tests: chosen numbers, the files train() leaves."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lorafit.config import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


def table_line(md: str, label: str) -> str:
    lines = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
    assert lines, f"no table row {label!r} in:\n{md}"
    return lines[0]


def fake_run(root: Path, task: str = "mrpc", method: str = "lora", rank: int = 8, seed: int = 0,
             value: float = 0.8, targets: list[str] | None = None, resolved: list[str] | None = None,
             status: str = "finished", curve: list[float] | None = None, **settings) -> Path:
    """A run directory as train() leaves it, with chosen numbers (for the aggregation logic only)."""
    metric = {"cola": "matthews_correlation", "stsb": "pearson"}.get(task, "accuracy")
    name = f"{task}-{method}-r{rank}-{'+'.join(targets or ['d'])}-{'-'.join(f'{k}{v}' for k, v in settings.items())}"
    path = root / name / f"seed{seed}"
    path.mkdir(parents=True)
    cfg = TrainConfig(task=task, method=method, rank=rank, seed=seed, target_modules=targets, output_dir=str(path),
                      **settings)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    adapter = 6 * 2 * rank * 768 if method == "lora" else 0
    summary = {
        "status": status, "task": task, "model": "sentence-transformers/all-MiniLM-L6-v2", "method": method,
        "rank": rank if method == "lora" else None, "target_modules": targets, "seed": seed, "metric": metric,
        "best_metric": value, "best_epoch": 2.0, "best_metrics": {metric: value},
        "trainable_parameters": {"adapter": adapter, "head": 770,
                                 "trainable": adapter + 770 if method == "lora" else 22713986, "total": 22713986},
        "train_seconds": 10.0, "examples_per_second": 100.0,
        "hardware": {"device": "cpu", "cpu": "test CPU", "threads": 1},
    }
    (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if curve:
        lines = [json.dumps({"step": i + 1, "epoch": float(i + 1), metric: v}) for i, v in enumerate(curve)]
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if method == "lora":
        (path / "adapter").mkdir()
        (path / "adapter" / "adapter_config.json").write_text(
            json.dumps({"target_modules": resolved or targets or ["query", "value"]}), encoding="utf-8")
    return path
