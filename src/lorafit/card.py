"""Model cards: the ``README.md`` beside every adapter and exported model, as the Hub reads it.

The YAML front matter is written by huggingface_hub's ``ModelCardData`` (``base_model``,
``library_name``, tags, and the dev metrics as ``model-index`` results); the body says how the
model was trained (the exact ``lorafit train`` command), what it scored, and how to load it with
PEFT or Transformers and with lorafit. A card is a function of a small dict of facts
(:func:`card_facts`), which lorafit also keeps in the adapter's metadata so that ``lorafit
merge`` can write the merged model's card from the adapter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lorafit.config import TrainConfig
from lorafit.data import TaskSpec
from lorafit.io import atomic_write_bytes

__all__ = ["CARD_NAME", "card_facts", "make_card", "write_card"]

CARD_NAME = "README.md"
Library = Literal["peft", "transformers"]


def card_facts(cfg: TrainConfig, task: TaskSpec, metrics: dict[str, float] | None = None,
               epoch: float | None = None) -> dict[str, Any]:
    """What a card says about one trained model (JSON-serialisable)."""
    from lorafit.models import display_name
    from lorafit.report import train_command

    return {
        "name": Path(cfg.output_dir).name if cfg.output_dir else cfg.run_name(),
        "base_model": display_name(cfg.model),
        "method": cfg.method,
        "rank": cfg.rank if cfg.method == "lora" else None,
        "task": task.name,
        "glue_dir": task.glue_dir,
        "num_labels": task.num_labels,
        "metric": task.metric,
        "metrics": {k: round(float(v), 6) for k, v in (metrics or {}).items()},
        "epoch": epoch,
        "command": train_command(cfg.to_dict()),
        "validation_file": cfg.validation_file,
    }


def _eval_results(facts: dict[str, Any]) -> list[Any]:
    from huggingface_hub import EvalResult

    glue = facts.get("glue_dir") is not None
    dataset = {
        "dataset_type": "nyu-mll/glue" if glue else Path(facts.get("validation_file") or "custom").name,
        "dataset_name": f"GLUE {facts['glue_dir']}" if glue else facts["task"],
        "dataset_config": facts["task"] if glue else None,
        # MNLI's unsuffixed metrics cover both dev sets; they are still its validation split.
        "dataset_split": "validation",
    }
    return [
        EvalResult(task_type="text-classification", metric_type=name, metric_value=value,
                   metric_name=f"dev {name}", **dataset)
        for name, value in facts.get("metrics", {}).items()
    ]


def make_card(facts: dict[str, Any], library: Library, folder: str | Path = ".") -> Any:
    """A ``huggingface_hub.ModelCard`` for an adapter (``peft``) or a full model (``transformers``)."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["lorafit", "text-classification"]
    if facts.get("method") == "lora":
        tags += ["lora"] if library == "peft" else ["lora", "merged"]
    if facts.get("glue_dir"):
        tags += ["glue", facts["task"]]
    data = ModelCardData(
        base_model=facts["base_model"],
        library_name=library,
        pipeline_tag="text-classification",
        tags=tags,
        datasets=["nyu-mll/glue"] if facts.get("glue_dir") else None,
        model_name=facts["name"],
        eval_results=_eval_results(facts) or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts, library, Path(folder))}")


def _body(facts: dict[str, Any], library: Library, folder: Path) -> str:
    task = f"GLUE {facts['glue_dir']}" if facts.get("glue_dir") else f"the custom task {facts['task']!r}"
    if facts.get("method") == "lora":
        what = f"LoRA (r={facts['rank']}) adapter with a trained classification head"
        what += "" if library == "peft" else ", merged into the base weights"
    else:
        what = "fully fine-tuned model"
    base = facts["base_model"]
    # Link Hub ids only; a local folder has no page.
    shown = base if Path(base).exists() or "/" not in base else f"[{base}](https://huggingface.co/{base})"
    lines = [f"# {facts['name']}", "",
             f"A {what} of {shown} on {task}, trained with lorafit (LoRA: Hu et al., ICLR 2022).", ""]
    metrics = facts.get("metrics") or {}
    if metrics:
        at = f" (best epoch {facts['epoch']})" if facts.get("epoch") is not None else ""
        lines += ["## Result", "", f"Dev set{at}, selected by {facts['metric']}:", "",
                  "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()] + [""]
    if facts.get("command"):
        lines += ["## Training", "", "```bash", facts["command"], "```", ""]
    lines += ["## Use", "", "```python"]
    if library == "peft":
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  (f'base = AutoModelForSequenceClassification.from_pretrained("{facts["base_model"]}", '
                   f"num_labels={facts['num_labels']})"),
                  f'model = PeftModel.from_pretrained(base, "{folder}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{facts["base_model"]}")']
    else:
        lines += ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  f'model = AutoModelForSequenceClassification.from_pretrained("{folder}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{folder}")']
    lines += ["```", "", "With lorafit:", "", "```bash", f"lorafit eval {folder}",
              f'lorafit predict {folder} --text "..."', "```", ""]
    return "\n".join(lines)


def facts_for_export(source: str | Path, trained: Any, output: str | Path) -> dict[str, Any]:
    """The facts for the card of a model merged from ``source`` (a run or adapter directory).

    lorafit's adapters carry their card's facts in their metadata; otherwise (an adapter PEFT
    wrote, a full fine-tuning run) the card says what the source records.
    """
    from lorafit.io import read_json
    from lorafit.lora import read_adapter_metadata

    source = Path(source)
    adapter = source / "adapter" if (source / "adapter" / "adapter_config.json").exists() else source
    facts = dict(read_adapter_metadata(adapter).get("card") or {}) if (adapter / "adapter_config.json").exists() else {}
    if not facts and trained.config is not None and trained.task is not None:
        summary = source / "summary.json"
        best = read_json(summary) if summary.exists() else {}
        facts = card_facts(trained.config, trained.task, best.get("best_metrics"), best.get("best_epoch"))
    if not facts:
        from lorafit.models import display_name

        task = trained.task
        facts = {"base_model": display_name(getattr(trained.model.config, "_name_or_path", "") or "unknown"),
                 "method": "lora", "rank": None, "task": task.name if task else "unknown",
                 "glue_dir": task.glue_dir if task else None, "num_labels": trained.model.config.num_labels,
                 "metric": task.metric if task else None, "metrics": {}, "epoch": None, "command": None}
    return {**facts, "name": Path(output).name}


def write_card(folder: str | Path, facts: dict[str, Any], library: Library,
               location: str | Path | None = None) -> Path:
    """Write ``folder/README.md`` (atomically) and return its path.

    ``location`` is the folder the loading examples name, when ``folder`` is a temporary one.
    """
    path = Path(folder) / CARD_NAME
    atomic_write_bytes(path, str(make_card(facts, library, location or folder)).encode("utf-8"))
    return path
