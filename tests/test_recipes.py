"""The shipped YAML recipes: every one is found, validates, names itself, and carries the paper's values."""

from __future__ import annotations

import pytest

from lorafit.config import make_config
from lorafit.errors import LorafitError
from lorafit.recipes import find_recipe, list_recipes, recipe_root

GLUE = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
VENDORED = ("sst2", "mrpc", "rte", "cola", "stsb")
PAPER_MODELS = ("roberta-base", "roberta-large", "deberta-v2-xxlarge")

EXPECTED = sorted(
    [f"paper/{m}/{t}" for m in PAPER_MODELS for t in GLUE]
    + [f"minilm/{t}" for t in VENDORED]
    + [f"minilm/full/{t}" for t in VENDORED]
)
ALL = list_recipes()


def test_recipe_count_and_names() -> None:
    files = sorted(recipe_root().rglob("*.yaml"))
    # An exact count: a misplaced or stray file (or a .yml that list_recipes would miss) fails here.
    assert len(files) == len(EXPECTED) == 34
    assert not list(recipe_root().rglob("*.yml"))
    assert ALL == EXPECTED


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates_and_names_itself(name: str) -> None:
    path = find_recipe(name)
    assert path == recipe_root() / f"{name}.yaml"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# lorafit train --recipe {name}"
    cfg = make_config(path)
    assert cfg == make_config(name)  # by file path and by shipped name alike
    task = name.rsplit("/", 1)[-1]
    assert cfg.task == task
    if name.startswith("paper/"):
        assert cfg.method == "lora"
        assert cfg.lora_dropout == 0.0
        assert cfg.init_adapter == (f"runs/{name.split('/')[1]}-mnli/adapter" if task in ("mrpc", "rte", "stsb") else None)
    if name.startswith("minilm/"):
        assert cfg.model == "minilm" and cfg.max_length == 128
        assert cfg.method == ("full" if name.startswith("minilm/full/") else "lora")
    if cfg.init_adapter:
        assert not cfg.init_adapter.startswith("/")  # relative paths only


def test_roberta_values() -> None:
    for task in GLUE:
        base = make_config(f"paper/roberta-base/{task}")
        large = make_config(f"paper/roberta-large/{task}")
        for cfg in (base, large):
            assert (cfg.rank, cfg.alpha, cfg.target_modules) == (8, 16.0, ["query", "value"])
            assert cfg.warmup_ratio == 0.06 and cfg.weight_decay == 0.1
        assert base.model == "FacebookAI/roberta-base" and base.max_length == 512
        assert large.model == "FacebookAI/roberta-large"
    mrpc = make_config("paper/roberta-base/mrpc")
    assert (mrpc.learning_rate, mrpc.batch_size, mrpc.epochs) == (4e-4, 16, 30.0)
    cola = make_config("paper/roberta-base/cola")
    assert (cola.learning_rate, cola.batch_size, cola.epochs) == (4e-4, 32, 80.0)
    sst2 = make_config("paper/roberta-base/sst2")
    assert (sst2.learning_rate, sst2.batch_size, sst2.epochs) == (5e-4, 16, 60.0)
    rte = make_config("paper/roberta-large/rte")
    assert (rte.learning_rate, rte.batch_size, rte.epochs, rte.max_length) == (4e-4, 8, 20.0, 512)
    lcola = make_config("paper/roberta-large/cola")
    assert (lcola.learning_rate, lcola.batch_size, lcola.max_length) == (2e-4, 4, 128)
    lmnli = make_config("paper/roberta-large/mnli")
    assert (lmnli.learning_rate, lmnli.batch_size, lmnli.epochs, lmnli.max_length) == (3e-4, 4, 10.0, 128)


def test_deberta_values() -> None:
    for task in GLUE:
        cfg = make_config(f"paper/deberta-v2-xxlarge/{task}")
        assert cfg.model == "microsoft/deberta-v2-xxlarge"
        assert (cfg.rank, cfg.alpha, cfg.warmup_ratio) == (16, 32.0, 0.1)
        assert cfg.target_modules == ["query_proj", "value_proj"]
        assert cfg.classifier_dropout is not None
    expect = {  # lr (script), batch, epochs, weight decay, CLS dropout, max length
        "mnli": (1e-4, 8, 5, 0.0, 0.15, 256),
        "sst2": (6e-5, 8, 16, 0.01, 0.0, 128),
        "mrpc": (2e-4, 32, 30, 0.01, 0.0, 128),
        "cola": (1.3e-4, 4, 10, 0.0, 0.1, 64),
        "qnli": (1e-4, 6, 8, 0.01, 0.1, 512),
        "qqp": (1e-4, 8, 11, 0.01, 0.2, 320),
        "rte": (2.6e-4, 4, 11, 0.01, 0.2, 320),
        "stsb": (2e-4, 4, 10, 0.1, 0.2, 128),
    }
    for task, values in expect.items():
        cfg = make_config(f"paper/deberta-v2-xxlarge/{task}")
        got = (cfg.learning_rate, cfg.batch_size, cfg.epochs, cfg.weight_decay, cfg.classifier_dropout, cfg.max_length)
        assert got == values, task


def test_deviations_are_recorded_in_comments() -> None:
    text = find_recipe("paper/roberta-base/mrpc").read_text(encoding="utf-8")
    assert "Table 9 says alpha = 8" in text and "--grad-accum 8" in text
    text = find_recipe("paper/deberta-v2-xxlarge/cola").read_text(encoding="utf-8")
    assert "Table 10 says 1e-4" in text and "--warmup_steps 100" in text and "Table 10 says 8" in text
    assert "Table 10 says 2e-4" in find_recipe("paper/deberta-v2-xxlarge/rte").read_text(encoding="utf-8")
    for name in ALL:
        if name.startswith("minilm/"):
            lines = find_recipe(name).read_text(encoding="utf-8").splitlines()
            assert any(line.startswith("# measured: ") for line in lines), name


def test_minilm_recipes_are_the_cells_of_the_measured_study() -> None:
    # The MiniLM recipes hold exactly the settings docs/reproduction.md measured (grid minilm-cpu-main),
    # so `lorafit train --recipe minilm/<task>` reproduces one of its runs.
    from lorafit.sweep import expand, load_grid

    cells = {c.name: c.config.to_dict() for c in expand(load_grid("minilm-cpu-main"))}
    for task in VENDORED:
        for recipe, group in ((f"minilm/{task}", f"{task}/lora-r8"), (f"minilm/full/{task}", f"{task}/full")):
            expected = {k: v for k, v in cells[f"{group}/seed0"].items() if k != "output_dir"}
            got = {k: v for k, v in make_config(recipe).to_dict().items() if k != "output_dir"}
            assert got == expected, recipe


def test_unknown_key_names_file_and_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("task: mrpc\nlearning_rate: 4.0e-4\nlearnig_rate: 5.0e-4\n", encoding="utf-8")
    with pytest.raises(LorafitError) as info:
        make_config(path)
    assert str(path) in str(info.value) and "learnig_rate" in str(info.value)


def test_unknown_recipe_name_is_an_error() -> None:
    with pytest.raises(LorafitError, match="no such recipe"):
        make_config("paper/roberta-base/nope")
