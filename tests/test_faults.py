"""The fault matrix: bad input of every kind, each ending in one line, exit 2, nothing changed.

Every case drives the CLI in-process over a workspace holding a finished run, an unfinished run
(to resume), data files, recipes and adapters, and checks that the workspace is byte-identical
afterwards: no file changed, none added, none removed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.cli import main

SMALL = ["--task", "mrpc", "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8",
         "--max-length", "32", "--no-progress", "--num-threads", "1", "--max-steps", "2", "--eval-steps", "2"]


def cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors
        return e.code


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: a finished run and broken copies of its pieces, data files and recipes."""
    root = tmp_path_factory.mktemp("faults")
    run = root / "run"
    assert cli(["train", *SMALL, "--output-dir", str(run)]) == 0
    (root / "afile").write_text("a regular file\n")
    # An unfinished run (its summary gone): resumable, and broken copies of its checkpoint.
    def unfinished(name: str) -> Path:
        copy = root / name
        shutil.copytree(run, copy)
        (copy / "summary.json").unlink()
        return copy

    unfinished("resumable")
    ck = unfinished("ck-truncated") / "checkpoint" / "trainable.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    ck = unfinished("ck-shapes") / "checkpoint" / "trainable.safetensors"
    save_file({k: torch.zeros(3, 3) for k in load_file(ck)}, ck)
    torch.save({"when": datetime.date(2024, 1, 1)}, unfinished("ck-pickle") / "checkpoint" / "training_state.pt")
    (unfinished("ck-noconfig") / "config.yaml").unlink()
    (unfinished("ck-state") / "checkpoint" / "state.json").write_text("{not json")
    # Run folders with a broken config.yaml.
    (unfinished("cfg-yaml") / "config.yaml").write_text("task: [mrpc\n")
    config = (run / "config.yaml").read_text()
    (unfinished("cfg-type") / "config.yaml").write_text(config.replace("rank: 8", "rank: eight"))
    (unfinished("cfg-bytes") / "config.yaml").write_bytes(b"task: \xff\xfe\n")
    # Adapters: foreign base model, truncated weights, broken config.
    def adapter(name: str) -> Path:
        copy = root / name
        shutil.copytree(run / "adapter", copy)
        return copy

    foreign = adapter("ad-foreign") / "adapter_config.json"
    foreign.write_text(json.dumps({**json.loads(foreign.read_text()), "base_model_name_or_path": "bert-base-uncased"}))
    weights = adapter("ad-truncated") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    (adapter("ad-json") / "adapter_config.json").write_text("{")
    # Data files.
    data = root / "data"
    data.mkdir()
    (data / "train.csv").write_text("text,label\na good film,1\na bad film,0\n" * 8)
    (data / "dev.csv").write_text("text,label\nfine,1\nawful,0\n")
    (data / "latin1.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    (data / "nolabel.csv").write_text("text,stars\nok,1\n")
    (data / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    (data / "in-latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    # Recipes.
    recipes = root / "recipes"
    recipes.mkdir()
    for name, text in {"targets.yaml": "target_modules: 5\n", "task.yaml": "task: 3\n",
                       "syntax.yaml": "rank: [8\n", "list.yaml": "- rank\n- 8\n", "lr.yaml": "learning_rate: .inf\n",
                       "rank.yaml": "rank: 0\n", "unknown.yaml": "rnak: 8\n", "seed.yaml": "seed: -3\n",
                       "epochs.yaml": "epochs: .nan\n", "dropout.yaml": "lora_dropout: true\n"}.items():
        (recipes / name).write_text(text)
    (recipes / "latin1.yaml").write_bytes("task: caf\xe9\n".encode("latin-1"))
    return root


T = ["train", *SMALL]
R = "{ws}/recipes/"
# (id, args, what the one line must say)
CASES = [
    # flags: non-finite, out of range, wrong type
    ("lr-inf", [*T, "--learning-rate", "inf", "--output-dir", "{ws}/new"], "--learning-rate must be a finite number"),
    ("lr-nan", [*T, "--learning-rate", "nan", "--output-dir", "{ws}/new"], "--learning-rate must be a finite"),
    ("wd-nan", [*T, "--weight-decay", "nan", "--output-dir", "{ws}/new"], "--weight-decay must be a finite"),
    ("epochs-inf", [*T, "--epochs", "inf", "--output-dir", "{ws}/new"], "--epochs must be a finite"),
    ("epochs-nan", [*T, "--epochs", "nan", "--output-dir", "{ws}/new"], "--epochs must be a finite"),
    ("alpha-neg-inf", [*T, "--alpha=-inf", "--output-dir", "{ws}/new"], "--alpha must be a finite"),
    ("warmup-nan", [*T, "--warmup-ratio", "nan", "--output-dir", "{ws}/new"], "--warmup-ratio must be a finite"),
    ("grad-norm-neg", [*T, "--max-grad-norm", "-1", "--output-dir", "{ws}/new"], "--max-grad-norm must be >= 0"),
    ("seed-neg", [*T, "--seed", "-1", "--output-dir", "{ws}/new"], "--seed must be in [0, 2**32)"),
    ("max-eval-neg", [*T, "--max-eval-samples", "-5", "--output-dir", "{ws}/new"], "--max-eval-samples must be > 0"),
    ("seeds-twice", [*T, "--seeds", "1,1", "--output-dir", "{ws}/new"], "--seeds must be distinct"),
    ("batch-word", [*T, "--batch-size", "abc", "--output-dir", "{ws}/new"], "--batch-size: invalid int value"),
    ("max-length-long", [*T, "--max-length", "1000", "--output-dir", "{ws}/new"],
     "--max-length 1000: longer than the model's 512 position embeddings"),
    ("overwrite-epochs-inf", [*T, "--epochs", "inf", "--output-dir", "{ws}/run", "--overwrite"],
     "--epochs must be a finite"),
    ("overwrite-bad-data", [*T, "--train-file", "{ws}/data/nolabel.csv", "--validation-file", "{ws}/data/dev.csv",
                            "--text-columns", "text", "--output-dir", "{ws}/run", "--overwrite"], "nolabel.csv"),
    ("overwrite-long", [*T, "--max-length", "600", "--output-dir", "{ws}/run", "--overwrite"], "--max-length 600"),
    # recipes
    ("recipe-targets", [*T, "--recipe", R + "targets.yaml"], "targets.yaml: field 'target_modules' must be"),
    ("recipe-task", [*T, "--recipe", R + "task.yaml"], "task.yaml: field 'task' must be a string, got 3"),
    ("recipe-latin1", [*T, "--recipe", R + "latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    ("recipe-syntax", [*T, "--recipe", R + "syntax.yaml"], "syntax.yaml: not valid YAML"),
    ("recipe-list", [*T, "--recipe", R + "list.yaml"], "list.yaml: a recipe must be a mapping"),
    ("recipe-lr-inf", [*T, "--recipe", R + "lr.yaml"], "lr.yaml: field 'learning_rate' must be a finite number"),
    ("recipe-rank-0", ["train", "--recipe", R + "rank.yaml"], "rank.yaml: field 'rank': --rank must be > 0"),
    ("recipe-unknown", [*T, "--recipe", R + "unknown.yaml"], "unknown.yaml: unknown key(s) rnak"),
    ("recipe-seed", ["train", "--recipe", R + "seed.yaml"], "seed.yaml: field 'seed'"),
    ("recipe-epochs-nan", [*T, "--recipe", R + "epochs.yaml"], "epochs.yaml: field 'epochs' must be a finite"),
    ("recipe-bool-float", [*T, "--recipe", R + "dropout.yaml"], "dropout.yaml: field 'lora_dropout'"),
    ("recipe-missing", [*T, "--recipe", R + "none.yaml"], "none.yaml: file not found"),
    # data
    ("data-missing", [*T, "--train-file", "{ws}/data/none.csv", "--validation-file", "{ws}/data/dev.csv",
                      "--output-dir", "{ws}/new"], "none.csv"),
    ("data-latin1", [*T, "--train-file", "{ws}/data/latin1.csv", "--validation-file", "{ws}/data/dev.csv",
                     "--output-dir", "{ws}/new"], "latin1.csv"),
    ("data-no-label", [*T, "--train-file", "{ws}/data/nolabel.csv", "--validation-file", "{ws}/data/dev.csv",
                       "--output-dir", "{ws}/new"], "nolabel.csv"),
    ("data-jsonl", [*T, "--train-file", "{ws}/data/bad.jsonl", "--validation-file", "{ws}/data/dev.csv",
                    "--output-dir", "{ws}/new"], "bad.jsonl"),
    ("data-dir-missing", [*T, "--data-dir", "{ws}/nodata", "--output-dir", "{ws}/new"], "nodata"),
    ("predict-input-latin1", ["predict", "{ws}/run", "--input", "{ws}/data/in-latin1.txt"], "in-latin1.txt: not UTF-8"),
    # adapters
    ("adapter-foreign-eval", ["eval", "{ws}/ad-foreign"], "adapter was trained on base model 'bert-base-uncased'"),
    ("adapter-foreign-init", [*T, "--init-adapter", "{ws}/ad-foreign", "--output-dir", "{ws}/new"],
     "adapter was trained on base model 'bert-base-uncased'"),
    ("adapter-truncated", ["eval", "{ws}/ad-truncated"], "adapter_model.safetensors: not a readable safetensors"),
    ("adapter-json", ["predict", "{ws}/ad-json", "--text", "hi"], "adapter_config.json: not valid JSON"),
    ("adapter-truncated-init", [*T, "--init-adapter", "{ws}/ad-truncated", "--output-dir", "{ws}/new"],
     "not a readable safetensors"),
    # checkpoints
    ("ck-truncated", [*T, "--output-dir", "{ws}/ck-truncated", "--resume"], "trainable.safetensors: not a readable"),
    ("ck-shapes", [*T, "--output-dir", "{ws}/ck-shapes", "--resume"], "has shape (3, 3)"),
    ("ck-pickle", [*T, "--output-dir", "{ws}/ck-pickle", "--resume"], "training_state.pt: not a readable checkpoint"),
    ("ck-no-config", [*T, "--output-dir", "{ws}/ck-noconfig", "--resume"], "ck-noconfig: not a lorafit run directory (no config.yaml)"),
    ("ck-state-json", [*T, "--output-dir", "{ws}/ck-state", "--resume"], "state.json: not valid JSON"),
    ("ck-none", [*T, "--output-dir", "{ws}/data", "--resume"], "has no checkpoint to resume from"),
    ("ck-settings", [*T, "--rank", "4", "--output-dir", "{ws}/resumable", "--resume"], "settings differ"),
    # run folders
    ("run-yaml", ["eval", "{ws}/cfg-yaml"], "cfg-yaml/config.yaml: not valid YAML"),
    ("run-type", ["eval", "{ws}/cfg-type"], "cfg-type/config.yaml: --rank must be an integer, got 'eight'"),
    ("run-bytes", ["predict", "{ws}/cfg-bytes", "--text", "hi"], "cfg-bytes/config.yaml: not UTF-8"),
    ("run-finished", [*T, "--output-dir", "{ws}/run"], "holds a finished run; pass --overwrite"),
    ("eval-batch-0", ["eval", "{ws}/run", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("eval-max-eval-neg", ["eval", "{ws}/run", "--max-eval-samples", "-1"], "--max-eval-samples: must be >= 1"),
    ("predict-batch-0", ["predict", "{ws}/run", "--text", "hi", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("stats-length-0", ["data", "stats", "rte", "--max-length", "0"], "--max-length: must be >= 1"),
    # output paths
    ("merge-onto-run", ["merge", "{ws}/run", "--output", "{ws}/run"], "is the input PATH"),
    ("merge-onto-run-overwrite", ["merge", "{ws}/run", "--output", "{ws}/run", "--overwrite"], "is the input PATH"),
    ("merge-inside-run", ["merge", "{ws}/run", "--output", "{ws}/run/merged"], "lies inside the input PATH"),
    ("merge-over-adapter", ["merge", "{ws}/run/adapter", "--output", "{ws}/run", "--overwrite"],
     "contains the input PATH"),
    ("merge-under-file", ["merge", "{ws}/run", "--output", "{ws}/afile/merged"], "afile is a file"),
    ("merge-not-empty", ["merge", "{ws}/run", "--output", "{ws}/data"], "exists and is not empty"),
    ("train-under-file", [*T, "--output-dir", "{ws}/afile/run"], "afile is a file"),
    ("train-over-data", [*T, "--train-file", "{ws}/data/train.csv", "--validation-file", "{ws}/data/dev.csv",
                         "--output-dir", "{ws}/data"], "contains the input --train-file"),
    ("train-over-init", [*T, "--init-adapter", "{ws}/run/adapter", "--output-dir", "{ws}/run", "--overwrite"],
     "contains the input --init-adapter"),
    ("report-onto-run", ["report", "{ws}/run", "--output", "{ws}/run"], "is the input DIR"),
    ("sweep-under-file", ["sweep", "--tasks", "rte", "--output-dir", "{ws}/afile/sweep"], "afile is a file"),
]


def test_the_matrix_is_large_and_its_cases_distinct():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, args, expected, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ws)  # a default output (runs/...) would land here and show in the checksums
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAFIT_DEBUG", raising=False)
    before = checksums(ws)
    capsys.readouterr()
    code = cli([a.format(ws=ws) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected.format(ws=ws) in err, err
    assert checksums(ws) == before


def test_cache_path_that_is_a_file_is_one_line(ws, capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LORAFIT_CACHE", str(blocker))
    code = cli(["data", "stats", "rte", "--max-length", "16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"tokenization cache {blocker}" in err and "LORAFIT_CACHE" in err


def test_debug_shows_the_traceback(ws, monkeypatch):
    monkeypatch.setenv("LORAFIT_DEBUG", "1")
    from lorafit.errors import LorafitError

    with pytest.raises(LorafitError, match="--learning-rate must be a finite number"):
        main(["train", "--learning-rate", "inf", "--output-dir", str(ws / "new")])
