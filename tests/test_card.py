"""Model cards: every adapter and exported model folder gets a README.md the Hub can read."""

from __future__ import annotations

import json

import pytest
import yaml

from lorafit.cli import main
from lorafit.config import make_config
from lorafit.train import train


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few steps of LoRA on the embedded model, so the card names its Hub id."""
    out = tmp_path_factory.mktemp("card") / "stsb-run"
    train(make_config(task="stsb", max_train_samples=32, max_eval_samples=24, batch_size=8, max_length=48,
                      max_steps=4, eval_steps=2, progress=False, num_threads=1, output_dir=str(out)))
    return out


def test_adapter_card_names_base_model_library_and_dev_metric(run):
    meta, body = front_matter(run / "adapter" / "README.md")
    summary = json.loads((run / "summary.json").read_text())
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "peft"
    assert {"lora", "glue", "stsb"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    results = {m["type"]: m["value"] for r in entry["results"] for m in r["metrics"]}
    assert results["pearson"] == pytest.approx(summary["best_metrics"]["pearson"], abs=1e-6)
    assert set(results) == set(summary["best_metrics"])
    dataset = entry["results"][0]["dataset"]
    assert (dataset["type"], dataset["config"], dataset["split"]) == ("nyu-mll/glue", "stsb", "validation")
    # The body: the exact command (with the precision "auto" resolved to), and how to load the
    # adapter with PEFT and with lorafit.
    assert (f"lorafit train --task stsb --batch-size 8 --max-steps 4 --precision {summary['precision']} "
            "--max-length 48") in body
    assert f"--output-dir {run}" in body
    assert f'PeftModel.from_pretrained(base, "{run / "adapter"}")' in body
    assert f"lorafit eval {run / 'adapter'}" in body


def test_card_command_reproduces_the_run_config(run):
    import shlex

    from lorafit.cli import build_parser
    from lorafit.config import TrainConfig

    _, body = front_matter(run / "adapter" / "README.md")
    command = body.split("```bash\n", 1)[1].split("\n", 1)[0]
    args = build_parser().parse_args(shlex.split(command)[1:])
    given = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert make_config(**given).to_dict() == {**saved, "progress": True}  # --no-progress is not part of a run


def test_merged_export_gets_the_same_card_for_transformers(run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out)]) == 0
    meta, body = front_matter(out / "README.md")
    adapter_meta, _ = front_matter(run / "adapter" / "README.md")
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert meta["base_model"] == adapter_meta["base_model"]
    assert meta["model-index"][0]["results"] == adapter_meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "merged"
    assert f'AutoModelForSequenceClassification.from_pretrained("{out}")' in body
    assert ".tmp" not in body


def test_full_finetuning_model_folder_gets_a_transformers_card(tiny_model_dir, tmp_path, one_thread):
    train(make_config(task="rte", model=str(tiny_model_dir), method="full", max_train_samples=16,
                      max_eval_samples=16, batch_size=8, max_length=48, max_steps=2, progress=False,
                      output_dir=str(tmp_path / "full")))
    meta, _ = front_matter(tmp_path / "full" / "model" / "README.md")
    assert meta["library_name"] == "transformers" and meta["base_model"] == str(tiny_model_dir)
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
