"""lorafit sweep: grid files and flags, cell expansion and naming, validation, and resuming.

The end-to-end test (marked slow) trains a real 2 ranks x 2 seeds sweep on the CPU (3 steps per cell on
16 MRPC examples) in a subprocess, kills it half-way with SIGKILL, runs the same command again, and
reports on it; the default suite resumes a sweep in-process instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafit.cli import build_parser, main
from lorafit.config import TrainConfig
from lorafit.errors import LorafitError
from lorafit.run import RunDir
from lorafit.sweep import (
    SWEEP_FILE,
    Grid,
    expand,
    format_progress,
    grid_from_args,
    grid_root,
    list_grids,
    load_grid,
    resolved,
    run_sweep,
)

# Tiny, fast cells: 16 training examples in batches of 8 (2 steps an epoch), 3 steps, 16 dev examples.
TINY = ["--max-steps", "3", "--max-train-samples", "16", "--batch-size", "8", "--max-eval-samples", "16",
        "--max-length", "32", "--num-threads", "1", "--no-progress"]


def parse(*argv: str):
    return build_parser().parse_args(["sweep", *argv])


def write_grid(path: Path, data: dict, first_line: str | None = None) -> Path:
    text = (first_line or f"# lorafit sweep --grid {path.name}") + "\n" + yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def names(cells) -> list[str]:
    return [c.name for c in cells]


# -- expansion and naming (no training) -------------------------------------------------------


def test_flags_build_the_grid_with_readable_cell_names(tmp_path: Path) -> None:
    args = parse("--tasks", "mrpc,rte", "--methods", "lora,full", "--ranks", "1,8", "--targets", "query,value",
                 "--targets", "query,key", "--seeds", "0,1", "--output-dir", str(tmp_path / "sw"), "--epochs", "2")
    cells = expand(grid_from_args(args))
    lora = [f"{t}/lora-r{r}-{tg}/seed{s}" for t in ("mrpc", "rte") for r in (1, 8)
            for tg in ("query+value", "query+key") for s in (0, 1)]
    full = [f"{t}/full/seed{s}" for t in ("mrpc", "rte") for s in (0, 1)]
    assert sorted(names(cells)) == sorted(lora + full)
    assert len(cells) == 2 * (2 * 2 * 2 + 2)  # tasks x (ranks x targets x seeds + seeds of full)
    cell = next(c for c in cells if c.name == "rte/lora-r8-query+key/seed1")
    assert (cell.config.task, cell.config.method, cell.config.rank, cell.config.seed) == ("rte", "lora", 8, 1)
    assert cell.config.target_modules == ["query", "key"] and cell.config.epochs == 2.0
    assert cell.config.output_dir == str(tmp_path / "sw" / "rte" / "lora-r8-query+key" / "seed1")
    # Axis order: the last axis (seed) varies fastest.
    assert names(cells)[:2] == ["mrpc/lora-r1-query+value/seed0", "mrpc/lora-r1-query+value/seed1"]


def test_full_cells_are_not_multiplied_by_rank_and_targets(tmp_path: Path) -> None:
    grid = Grid(str(tmp_path), axes={"method": ["lora", "full"], "rank": [1, 2, 4],
                                     "target_modules": [None, ["query", "key"]], "seed": [0, 1]})
    cells = expand(grid)
    full = [c for c in cells if c.config.method == "full"]
    assert [c.name for c in full] == ["mrpc/full/seed0", "mrpc/full/seed1"]
    assert len(cells) == 3 * 2 * 2 + 2
    # LoRA-only settings are reset for full fine-tuning, so the two full cells differ only by seed.
    defaults = TrainConfig()
    for c in full:
        assert (c.config.rank, c.config.target_modules, c.config.alpha) == (defaults.rank, None, defaults.alpha)
    # The default target set (null) is left out of the name; an explicit one is in it.
    assert {"mrpc/lora-r4/seed0", "mrpc/lora-r4-query+key/seed0"} <= set(names(cells))


def test_yaml_grid_and_flags_build_the_same_cells(tmp_path: Path) -> None:
    out = str(tmp_path / "sw")
    path = write_grid(tmp_path / "g.yaml", {
        "output_dir": out,
        "base": {"epochs": 2, "max_train_samples": 64},
        "grid": {"task": ["mrpc", "rte"], "method": ["lora", "full"], "rank": [2, 4], "seed": [0, 1]},
    })
    from_yaml = expand(grid_from_args(parse("--grid", str(path))))
    from_flags = expand(grid_from_args(parse("--tasks", "mrpc,rte", "--methods", "lora,full", "--ranks", "2,4",
                                             "--seeds", "0,1", "--epochs", "2", "--max-train-samples", "64",
                                             "--output-dir", out)))
    assert [(c.name, c.config) for c in from_yaml] == [(c.name, c.config) for c in from_flags]
    # Flags on top of a grid file: an axis flag replaces that axis, a training flag the base value.
    narrowed = expand(grid_from_args(parse("--grid", str(path), "--tasks", "rte", "--epochs", "1")))
    assert {c.config.task for c in narrowed} == {"rte"} and {c.config.epochs for c in narrowed} == {1.0}


def test_overrides_give_full_fine_tuning_its_own_learning_rate(tmp_path: Path) -> None:
    path = write_grid(tmp_path / "g.yaml", {
        "output_dir": str(tmp_path / "sw"),
        "base": {"recipe": "minilm/mrpc", "epochs": 1},
        "grid": {"task": ["mrpc", "rte"], "method": ["lora", "full"], "rank": [4, 8], "seed": [0]},
        "overrides": {"method": {"full": {"learning_rate": 5.0e-5}}, "task": {"rte": {"max_train_samples": 100}}},
    })
    cells = {c.name: c.config for c in expand(load_grid(path))}
    assert cells["mrpc/full/seed0"].learning_rate == 5e-5
    assert cells["rte/full/seed0"].max_train_samples == 100 and cells["mrpc/full/seed0"].max_train_samples is None
    # The recipe is the layer below: LoRA cells keep its learning rate and alpha, the grid's epochs.
    lora = cells["rte/lora-r4/seed0"]
    assert (lora.learning_rate, lora.alpha, lora.lora_dropout, lora.epochs) == (5e-4, 16.0, 0.1, 1.0)
    assert lora.max_train_samples == 100
    assert cells["mrpc/full/seed0"].lora_dropout == 0.0  # LoRA settings of the recipe do not leak into full


def test_a_swept_learning_rate_is_named_and_overrides_collapse_cells(tmp_path: Path) -> None:
    grid = Grid(str(tmp_path), axes={"method": ["lora", "full"], "learning_rate": [1e-4, 5e-4], "seed": [0]},
                overrides={"method": {"full": {"learning_rate": 5e-5}}})
    cells = {c.name: c.config for c in expand(grid)}
    # Full fine-tuning gets its own rate, so its two learning-rate cells are one.
    assert set(cells) == {"mrpc/lora-r8-lr0.0001/seed0", "mrpc/lora-r8-lr0.0005/seed0", "mrpc/full-lr5e-05/seed0"}
    assert cells["mrpc/lora-r8-lr0.0001/seed0"].learning_rate == 1e-4


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 5e-5 (no dot) as text; the grid takes it as the number it means, also as an override key.
    path = tmp_path / "g.yaml"
    path.write_text("output_dir: o\ngrid:\n  learning_rate: [5e-5, 1e-4]\n"
                    "overrides:\n  learning_rate:\n    5e-5: {epochs: 1}\n", encoding="utf-8")
    cells = {c.name: c.config for c in expand(load_grid(path))}
    assert cells["mrpc/lora-r8-lr5e-05-ep1/seed0"].learning_rate == 5e-5
    assert cells["mrpc/lora-r8-lr5e-05-ep1/seed0"].epochs == 1.0 and cells["mrpc/lora-r8-lr0.0001-ep3/seed0"].epochs == 3.0


def test_model_axis_prefixes_the_directory(tmp_path: Path) -> None:
    grid = Grid(str(tmp_path), axes={"model": ["minilm", "models/tiny-bert"], "seed": [0]})
    assert names(expand(grid)) == ["minilm/mrpc/lora-r8/seed0", "tiny-bert/mrpc/lora-r8/seed0"]


def test_resolved_grid_file_reloads_to_the_same_cells(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    grid = grid_from_args(parse("--tasks", "mrpc", "--methods", "lora,full", "--ranks", "1,2", "--targets", "default",
                                "--targets", "query,key", "--learning-rates", "1e-4,3e-4", "--seeds", "0,1",
                                "--output-dir", str(out), *TINY))
    cells = expand(grid)
    out.mkdir()
    (out / SWEEP_FILE).write_text(resolved(grid).to_yaml(cells), encoding="utf-8")
    first = (out / SWEEP_FILE).read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# lorafit sweep --grid {out / SWEEP_FILE}"
    again = expand(load_grid(out / SWEEP_FILE))
    assert [(c.name, c.config) for c in again] == [(c.name, c.config) for c in cells]
    # `lorafit sweep --output-dir DIR` alone continues the sweep recorded in DIR.
    alone = expand(grid_from_args(parse("--output-dir", str(out))))
    assert [(c.name, c.config) for c in alone] == [(c.name, c.config) for c in cells]


def test_shipped_grids_name_themselves_and_expand() -> None:
    assert list_grids() == ["minilm-ablation", "minilm-conv-ablation", "minilm-conv-head", "minilm-conv-lr-full", "minilm-conv-lr-lora",
                            "minilm-conv-lr-wide",
                            "minilm-conv-seeds-full", "minilm-conv-seeds-lora", "minilm-cpu-head",
                            "minilm-cpu-main", "minilm-cpu-rank", "minilm-cpu-targets", "minilm-cpu-variants",
                            "minilm-cpu-variants-lr", "minilm-cpu-variants-lr-wide", "minilm-main", "smoke"]
    for name in list_grids():
        path = grid_root() / f"{name}.yaml"
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first in (f"# lorafit sweep --grid {name}", f"# lorafit sweep --grid {name} --jobs 2")
        grid = load_grid(name)
        assert grid.source == str(path) and not Path(grid.output_dir).is_absolute()
        assert expand(grid)
    main_cells = {c.name: c.config for c in expand(load_grid("minilm-main"))}
    assert len(main_cells) == 5 * 2 * 5  # tasks x (LoRA, full) x seeds, each from its recipe
    assert main_cells["rte/full/seed4"].learning_rate == 5e-5 and main_cells["rte/full/seed4"].epochs == 3.0
    assert main_cells["sst2/lora-r8/seed0"].batch_size == 32
    ablation = expand(load_grid("minilm-ablation"))
    assert len(ablation) == 2 * (6 * 4 * 3 + 3)
    assert {c.config.learning_rate for c in ablation if c.config.method == "full"} == {5e-5}
    # The grids of docs/reproduction.md: 5 tasks x 2 methods x 3 seeds; 2 tasks x 5 ranks x 2 seeds;
    # 2 target sets x 2 seeds; the head study, 2 tasks x 3 seeds.
    cpu = {c.name: c.config for c in expand(load_grid("minilm-cpu-main"))}
    assert len(cpu) == 30 and cpu["sst2/full/seed2"].max_train_samples == 16000
    assert cpu["cola/full/seed1"].learning_rate == 5e-5 and cpu["cola/lora-r8/seed1"].learning_rate == 5e-4
    assert len(expand(load_grid("minilm-cpu-rank"))) == 20 and len(expand(load_grid("minilm-cpu-targets"))) == 4
    assert len(expand(load_grid("minilm-cpu-head"))) == 2 * 3
    # The converged protocol's learning-rate searches: 5 tasks x 3 learning rates, one seed.
    assert len(expand(load_grid("minilm-conv-lr-lora"))) == len(expand(load_grid("minilm-conv-lr-full"))) == 15
    # Then seeds 1 and 2 at each task's chosen rate, and the head study: 2 tasks x 2 heads, seed 0.
    for method in ("lora", "full"):
        seeds = {c.name: c.config for c in expand(load_grid(f"minilm-conv-seeds-{method}"))}
        assert len(seeds) == 5 * 2 and {c.seed for c in seeds.values()} == {1, 2}
        assert seeds[f"sst2/{method}{'-r8' if method == 'lora' else ''}/seed1"].max_train_samples == 16000
    wide = {c.name: c.config for c in expand(load_grid("minilm-conv-lr-wide"))}
    assert wide["stsb/lora-r8/seed0"].learning_rate == 2.5e-4 and wide["rte/full/seed0"].learning_rate == 1e-5
    assert wide["rte/lora-r8/seed0"].learning_rate == 2.5e-4 and len(wide) == 8
    assert wide["sst2/full/seed0"].max_train_samples == 16000 and wide["cola/full/seed0"].batch_size == 32
    head = {c.name: c.config for c in expand(load_grid("minilm-conv-head"))}
    assert head["cola/lora-r8-saveclassifier-headlrnone/seed0"].modules_to_save == ["classifier"]
    assert head["mrpc/lora-r8-saveclassifier+pooler-headlr0.0001/seed0"].head_learning_rate == 1e-4
    # The converged ablations on SST-2: 4 ranks and 2 target sets x 3 seeds, seed 0 of every cell first.
    conv_ablation = expand(load_grid("minilm-conv-ablation"))
    assert [c.config.seed for c in conv_ablation] == [0] * 6 + [1] * 6 + [2] * 6
    assert {(c.config.rank, tuple(c.config.target_modules or ())) for c in conv_ablation} == {
        (1, ()), (2, ()), (4, ()), (64, ()), (8, ("query", "key")),
        (8, ("query", "key", "value", "attention.output.dense"))}
    assert {c.config.learning_rate for c in conv_ablation} == {1e-3}
    # The variants study: 3 tasks x 6 variants (LoRA, rsLoRA, DoRA, LoRA+, PiSSA, full) x 3 seeds, each
    # variant at its own rate; its search: 3 tasks x (5 LoRA variants x 3 rates + 3 full rates), seed 0.
    variants = {c.name: c.config for c in expand(load_grid("minilm-cpu-variants"))}
    assert {c.seed for c in variants.values()} == {1, 2} and len(variants) % (6 * 2) == 0
    assert variants["mrpc/lora-r8-use_dora-lr0.0005/seed2"].use_dora
    assert variants["mrpc/lora-r8-loraplus16-lr0.0002/seed1"].loraplus_lr_ratio == 16
    assert variants["mrpc/lora-r8-initpissa-lr0.001/seed1"].init_lora_weights == "pissa"
    assert variants["mrpc/full-lr0.0001/seed1"].method == "full"
    search = expand(load_grid("minilm-cpu-variants-lr"))
    assert len(search) == 3 * (5 * 3 + 3)
    rates: dict[str, set[float]] = {}
    for c in search:  # each variant searched over its own three rates, the same on every task
        rates.setdefault(c.name.split("/")[1].rsplit("-lr", 1)[0], set()).add(c.config.learning_rate)
    assert rates == {"lora-r8": {5e-4, 1e-3, 2e-3}, "lora-r8-use_rslora": {2e-4, 5e-4, 1e-3},
                     "lora-r8-use_dora": {5e-4, 1e-3, 2e-3}, "lora-r8-loraplus16": {2e-4, 5e-4, 1e-3},
                     "lora-r8-initpissa": {1e-4, 2e-4, 5e-4}, "full": {2e-5, 5e-5, 1e-4}}
    # Its widened search: one rate beyond the edge where a variant's best rate lay, seed 0, on the
    # search's settings; none of its cells repeats a rate of the first search.
    wide = {c.name: c.config for c in expand(load_grid("minilm-cpu-variants-lr-wide"))}
    assert wide["mrpc/lora-r8-lr0.004/seed0"].learning_rate == 4e-3
    assert wide["mrpc/lora-r8-use_dora-lr0.00025/seed0"].use_dora and wide["mrpc/full-lr0.0002/seed0"].method == "full"
    assert not set(wide) & {c.name for c in search}
    first = next(c.config for c in search)
    assert all((c.epochs, c.rank, c.seed, c.precision) == (first.epochs, first.rank, 0, first.precision)
               for c in wide.values())


def test_the_variants_seeds_run_at_the_rates_their_committed_search_chose() -> None:
    # minilm-cpu-variants' rates are not picked by hand: each (task, variant) runs at the rate that
    # `lorafit report --tune learning_rate` chooses from the committed search runs, and a choice at
    # the edge of the first range has had its one step further (minilm-cpu-variants-lr-wide).
    import dataclasses

    from lorafit.report.rows import lora_kind
    from lorafit.report.runs import find_runs, group_runs
    from lorafit.report.tuning import tune_groups

    root = Path(__file__).resolve().parents[1] / "docs" / "reproduction" / "runs" / "variants"
    searches = [root / "lr"] + ([root / "lr-wide"] if (root / "lr-wide").is_dir() else [])

    def kind(settings: dict) -> str:
        return "FT" if settings.get("method") == "full" else lora_kind(settings)

    choices = {(c.task, kind(c.group.settings)): c
               for c in tune_groups(group_runs(find_runs(searches)), "learning_rate")}
    cells = expand(load_grid("minilm-cpu-variants"))
    assert cells
    for cell in cells:
        choice = choices[(cell.config.task, kind(dataclasses.asdict(cell.config)))]
        assert cell.config.learning_rate == choice.chosen, cell.name
        assert not choice.at_edge or len(choice.values) > 3, f"{cell.name}: search not widened at its edge"
        assert choice.search_seed == 0 and cell.config.batch_size == choice.group.runs[0].config["batch_size"]


def test_a_settings_axis_bundles_fields_and_may_pin_another_axis(tmp_path: Path) -> None:
    path = write_grid(tmp_path / "g.yaml", {"output_dir": str(tmp_path / "o"), "grid": {
        "learning_rate": [1e-4, 1e-3],
        "settings": [{}, {"use_dora": True, "lora_dropout": 0.1}, {"method": "full", "learning_rate": 5e-5}]}})
    cells = expand(load_grid(path))
    # The full bundle pins the rate, so its two cells are one; variant fields are named only when set.
    assert names(cells) == ["mrpc/lora-r8-dropout0-lr0.0001/seed0", "mrpc/lora-r8-dropout0.1-use_dora-lr0.0001/seed0",
                            "mrpc/full-lr5e-05/seed0", "mrpc/lora-r8-dropout0-lr0.001/seed0",
                            "mrpc/lora-r8-dropout0.1-use_dora-lr0.001/seed0"]
    assert [c.config.use_dora for c in cells] == [False, True, False, False, True]
    assert cells[2].config.learning_rate == 5e-5
    bad = write_grid(tmp_path / "b.yaml", {"output_dir": "o", "grid": {"settings": [{"use_droa": True}]}})
    with pytest.raises(LorafitError, match=r"grid\.settings\[0\]: unknown field 'use_droa'"):
        load_grid(bad)


def test_a_recipe_axis_and_a_recipe_flag(tmp_path: Path) -> None:
    path = write_grid(tmp_path / "g.yaml", {"output_dir": str(tmp_path / "o"),
                                             "grid": {"recipe": ["minilm/rte", "minilm/full/rte"], "seed": [0]}})
    assert names(expand(load_grid(path))) == ["rte/lora-r8/seed0", "rte/full/seed0"]
    # --recipe fixes the recipe for every cell, as any training flag fixes its field.
    cells = expand(grid_from_args(parse("--grid", str(path), "--recipe", "minilm/full/mrpc")))
    assert names(cells) == ["mrpc/full/seed0"]


# -- validation: every problem is found before anything runs ----------------------------------


BAD_GRIDS = [
    ({"output_dir": "o", "grids": {}}, "unknown key(s) grids"),
    ({"output_dir": "o", "base": {"learning_rat": 1e-4}}, "base: unknown field 'learning_rat'"),
    ({"output_dir": "o", "base": {"output_dir": "x"}}, "base: 'output_dir' cannot be set here"),
    ({"output_dir": "o", "base": {"seeds": [0, 1]}}, "use the grid axis 'seed'"),
    ({"output_dir": "o", "grid": {"rnak": [1, 2]}}, "grid: unknown field 'rnak'"),
    ({"output_dir": "o", "grid": {"rank": 4}}, "grid.rank: expected a non-empty list"),
    ({"output_dir": "o", "grid": {"rank": []}}, "grid.rank: expected a non-empty list"),
    ({"output_dir": "o", "grid": {"seed": [0, 0]}}, "grid.seed: value 0 is listed twice"),
    ({"output_dir": "o", "grid": {"num_threads": [1, 2]}}, "'num_threads' cannot be a grid axis"),
    ({"output_dir": "o", "grid": {"target_modules": [[]]}}, "grid.target_modules: empty target set"),
    ({"output_dir": "o", "grid": {"rank": [1, 0]}}, "cell rank=0: --rank must be > 0"),
    ({"output_dir": "o", "grid": {"task": ["mrpc", "mrcp"]}}, "cell task=mrcp: task: unknown task 'mrcp'"),
    ({"output_dir": "o", "grid": {"precision": ["fp16"]}}, "precision fp16 needs a GPU"),
    ({"output_dir": "o", "grid": {"task": ["mrpc", 3]}}, "cell task=3: task must be text, got 3"),
    ({"output_dir": "o", "grid": {"learning_rate": ["fast"]}}, "--learning-rate must be a finite number, got 'fast'"),
    ({"output_dir": "o", "grid": {"method": ["lora", "full"]}, "overrides": {"method": {"ful": {"epochs": 1}}}},
     "overrides.method.ful matches no cell"),
    ({"output_dir": "o", "grid": {"method": ["lora", "full"]}, "overrides": {"mehtod": {"full": {"epochs": 1}}}},
     "overrides: 'mehtod' is not a TrainConfig field"),
    ({"output_dir": "o", "overrides": {"method": {"lora": {"epoch": 1}}}}, "overrides.method.lora: unknown field 'epoch'"),
    ({"output_dir": "o", "grid": {"task": ["rte"]},
      "overrides": {"method": {"lora": {"epochs": 1}}, "task": {"rte": {"epochs": 2}}}},
     "overrides.method.lora and overrides.task.rte both set 'epochs'"),
    ({"grid": {"rank": [1]}}, "no sweep directory"),
    ({"output_dir": "o", "base": {"recipe": "minilm/nope"}}, "--recipe minilm/nope: no such recipe"),
    ({"output_dir": "o", "grid": {"recipe": "minilm/mrpc"}}, "grid.recipe: expected a non-empty list of recipe names"),
    (["rank", 1], "a grid file (keys output_dir, base, grid, overrides, cells) must be a mapping"),
]


@pytest.mark.parametrize(("data", "message"), BAD_GRIDS, ids=[m for _, m in BAD_GRIDS])
def test_bad_grid_files_fail_early_with_the_file_and_key(tmp_path: Path, monkeypatch, capsys, data, message) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(LorafitError) as e:
        expand(grid_from_args(parse("--grid", str(path))))
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}: ")
    # Through the CLI: one line, exit code 2, and no sweep directory.
    assert main(["sweep", "--grid", str(path)]) == 2
    assert capsys.readouterr().err.startswith("lorafit: error: ")
    assert not (tmp_path / "o").exists()


def test_bad_flags_fail_early(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sw"
    assert main(["sweep", "--tasks", "mrpc", "--ranks", "1,2", "--seeds", "0,0", "--output-dir", str(out)]) == 2
    assert "--seeds: value 0 is given twice" in capsys.readouterr().err
    assert main(["sweep", "--ranks", "2", "--learning-rate", "-1", "--output-dir", str(out)]) == 2
    assert "--learning-rate must be > 0" in capsys.readouterr().err
    assert main(["sweep", "--ranks", "1"]) == 2
    assert "no sweep directory" in capsys.readouterr().err
    assert main(["sweep"]) == 2
    assert "give a grid file" in capsys.readouterr().err
    assert not out.exists()


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("grid: [unclosed\n", encoding="utf-8")
    with pytest.raises(LorafitError, match=r"g\.yaml: not valid YAML"):
        load_grid(tmp_path / "g.yaml")
    with pytest.raises(LorafitError, match="--grid .*nope.yaml: file not found"):
        load_grid(tmp_path / "nope.yaml")
    with pytest.raises(LorafitError, match=r"--grid smoek: file not found \(shipped grids: minilm-ablation, "):
        load_grid("smoek")


def _fake_started_cell(cell, **changes) -> None:
    """A cell directory holding a run's config.yaml (as train writes it), without training."""
    cell.path.mkdir(parents=True)
    (cell.path / "config.yaml").write_text(yaml.safe_dump(cell.config.replace(**changes).to_dict()), encoding="utf-8")


def test_a_sweep_dir_with_another_grid_is_refused_unless_overwrite(tmp_path: Path, tiny_cell) -> None:
    out = tmp_path / "sw"
    first = Grid(str(out), base=dict(tiny_cell), axes={"rank": [1, 2], "seed": [0]})
    cells = expand(first)
    out.mkdir()
    (out / SWEEP_FILE).write_text(resolved(first).to_yaml(cells), encoding="utf-8")
    _fake_started_cell(cells[0])
    # Settings changed under an existing run: refused, nothing touched.
    changed = Grid(str(out), base={**tiny_cell, "epochs": 5.0}, axes={"rank": [1, 2], "seed": [0]})
    with pytest.raises(LorafitError, match=r"1 run\(s\) there were trained with other epochs \(e.g. mrpc/lora-r1/seed0\).*--overwrite"):
        run_sweep(changed, echo=lambda s: None)
    # A grid that drops cells of the recorded one and adds others: refused too.
    other = Grid(str(out), base=dict(tiny_cell), axes={"rank": [1, 3], "seed": [0]})
    with pytest.raises(LorafitError, match=r"1 cell\(s\) of .*sweep.yaml are not in this grid \(e.g. mrpc/lora-r2/seed0\)"):
        run_sweep(other, echo=lambda s: None)
    assert (cells[0].path / "config.yaml").exists()
    # Adding cells (more seeds) is fine: check_sweep_dir finds nothing to delete.
    from lorafit.sweep import check_sweep_dir

    more = Grid(str(out), base=dict(tiny_cell), axes={"rank": [1, 2], "seed": [0, 1]})
    assert check_sweep_dir(more, expand(more), overwrite=False) == []
    # --overwrite deletes exactly the runs that are in the way.
    assert check_sweep_dir(changed, expand(changed), overwrite=True) == [cells[0].path]


def test_a_part_of_the_recorded_sweep_runs_alone_and_keeps_the_record(tmp_path: Path, tiny_cell) -> None:
    out = tmp_path / "sw"
    whole = Grid(str(out), base=dict(tiny_cell), axes={"rank": [1, 2], "seed": [0]})
    out.mkdir()
    record = resolved(whole).to_yaml(expand(whole))
    (out / SWEEP_FILE).write_text(record, encoding="utf-8")
    lines: list[str] = []
    # As `lorafit sweep --grid <its sweep.yaml> --ranks 2` would: one cell of the two.
    part = Grid(str(out), base=dict(tiny_cell), axes={"rank": [2], "seed": [0]})
    (cell,) = run_sweep(part, echo=lines.append)
    assert cell.name == "mrpc/lora-r2/seed0" and RunDir(cell.path).is_finished()
    assert not (out / "mrpc/lora-r1").exists()
    assert (out / SWEEP_FILE).read_text(encoding="utf-8") == record
    assert f"sweep {out}: running 1 of the 2 cells of {out / SWEEP_FILE}" in lines


def test_a_grid_file_runs_part_by_part_as_one_sweep(tmp_path: Path, tiny_cell) -> None:
    # `--grid G --tasks sst2,cola` then `--grid G --tasks rte` on the same directory: the second part
    # is not "a different sweep", and sweep.yaml records the whole grid file, so continuing it from
    # its record (or rerunning G) finds both parts.
    out = tmp_path / "sw"
    grid_file = write_grid(tmp_path / "g.yaml", {"output_dir": str(out), "base": tiny_cell,
                                                 "grid": {"rank": [1, 2, 4], "seed": [0]}})
    lines: list[str] = []
    for rank in ("1", "2"):
        grid = grid_from_args(parse("--grid", str(grid_file), "--ranks", rank))
        (cell,) = run_sweep(grid, echo=lines.append)
        assert cell.name == f"mrpc/lora-r{rank}/seed0" and RunDir(cell.path).is_finished()
    assert f"sweep {out}: running 1 of the 3 cells of {grid_file}" in lines
    assert not (out / "mrpc/lora-r4").exists()
    record = yaml.safe_load((out / SWEEP_FILE).read_text(encoding="utf-8"))
    assert record["cells"] == ["mrpc/lora-r1/seed0", "mrpc/lora-r2/seed0", "mrpc/lora-r4/seed0"]
    assert record["grid"] == {"rank": [1, 2, 4], "seed": [0]}
    # The record continues the whole sweep: the two finished parts are skipped.
    lines.clear()
    cells = run_sweep(load_grid(out / SWEEP_FILE), echo=lines.append)
    assert len(cells) == 3 and all(RunDir(c.path).is_finished() for c in cells)
    assert sum(line.endswith("finished, skipped") for line in lines) == 2
    # A grid file the directory's runs are not part of is still another sweep.
    other = write_grid(tmp_path / "o.yaml", {"output_dir": str(out), "base": tiny_cell,
                                             "grid": {"rank": [8, 16], "seed": [0]}})
    with pytest.raises(LorafitError, match=r"3 cell\(s\) of .*sweep.yaml are not in this grid"):
        run_sweep(grid_from_args(parse("--grid", str(other), "--ranks", "8")), echo=lines.append)


# -- running ----------------------------------------------------------------------------------


def test_sweep_resumes_a_checkpointed_cell_and_restarts_one_killed_before_its_checkpoint(
        tmp_path: Path, tiny_cell, interrupt_after) -> None:
    from lorafit.train import train

    out = tmp_path / "sw"
    grid = Grid(str(out), base=dict(tiny_cell), axes={"rank": [1], "seed": [0, 1]})
    seed0, seed1 = expand(grid)
    # seed0: interrupted after step 2, i.e. after the end-of-epoch evaluation and checkpoint.
    with interrupt_after(2), pytest.raises(KeyboardInterrupt):
        train(seed0.config)
    assert (seed0.path / "checkpoint" / "state.json").exists() and not (seed0.path / "summary.json").exists()
    # seed1: stopped before its first checkpoint, with a stray metrics line.
    _fake_started_cell(seed1)
    (seed1.path / "metrics.jsonl").write_text('{"step": 99, "epoch": 9.0, "accuracy": 0.1}\n', encoding="utf-8")

    lines: list[str] = []
    run_sweep(grid, echo=lines.append)
    text = "\n".join(lines)
    assert "[1/2] mrpc/lora-r1/seed0: resuming from its checkpoint (step 2)" in text
    assert "[2/2] mrpc/lora-r1/seed1: starting again (stopped before its first checkpoint)" in text
    for cell in (seed0, seed1):
        steps = [json.loads(line)["step"] for line in (cell.path / "metrics.jsonl").read_text().splitlines()]
        assert steps == [2, 3]  # evaluated at the end of epoch 1 and at the last step, each once
    # The live summary: one line per configuration, with its seeds and median.
    table = format_progress([seed0, seed1])
    assert table.splitlines()[0].split() == ["task", "method", "rank", "targets", "seeds", "metric", "median", "%"]
    assert table.splitlines()[1].split()[:6] == ["mrpc", "lora", "1", "default", "2/2", "accuracy"]
    # Everything finished: a rerun trains nothing.
    lines.clear()
    run_sweep(grid, echo=lines.append)
    assert "2 cells, 2 finished, 0 to run" in lines[0] and "training" not in "\n".join(lines)


def _count_finished(root: Path) -> int:
    return sum(1 for _ in root.rglob("summary.json"))


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining_and_reports(tmp_path: Path) -> None:
    """The issue's acceptance test: 2 ranks x 2 seeds, SIGKILL half-way, rerun, report."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lorafit.cli", "sweep", "--tasks", "mrpc", "--ranks", "1,2", "--seeds", "0,1",
           "--output-dir", str(out), *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600
    try:
        while not (out.exists() and _count_finished(out) >= 1):
            assert proc.poll() is None, f"sweep ended before any cell finished:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no cell finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = {p.parent: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert 1 <= len(finished) < 4, log.read_text()
    assert (out / SWEEP_FILE).is_file()

    second = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    for run_dir, mtime in finished.items():  # finished cells were skipped, not trained again
        assert (run_dir / "summary.json").stat().st_mtime_ns == mtime
        assert f"{run_dir.relative_to(out).as_posix()}: finished, skipped" in second.stdout
    cells = [f"mrpc/lora-r{r}/seed{s}" for r in (1, 2) for s in (0, 1)]
    assert sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json")) == cells
    assert "4/4 cells finished" in second.stdout
    assert "2/2" in second.stdout.splitlines()[-2]  # the live summary: both seeds of the last configuration

    report = subprocess.run([sys.executable, "-m", "lorafit.cli", "report", str(out)], check=False, capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert report.returncode == 0, report.stdout + report.stderr
    folder = out / "report"
    import csv

    with open(folder / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for column in ("run", "task", "method", "rank", "seed", "metric", "best_metric", "best_epoch", "train_seconds",
                   "examples_per_second", "hardware", "trainable_parameters", "command"):
        assert column in rows[0]
    assert sorted((r["rank"], r["seed"]) for r in rows) == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert all(r["method"] == "lora" and r["task"] == "mrpc" and r["metric"] == "accuracy" for r in rows)
    assert all(r["command"].startswith("lorafit train --rank ") for r in rows)

    md = (folder / "results.md").read_text(encoding="utf-8")
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    for rank in (1, 2):
        assert any(f"LoRA r={rank} (query, value)" in line for line in table_rows)
    assert "## Rank ablation" in md
    # No full fine-tuning and no rank-8 run: the paper's rows stand in their own, labelled reference table.
    assert "## Reference: the paper's RoBERTa-base rows" in md and "Hu et al. 2022" in md
    paper = [line for line in table_rows if line.startswith("| RoB-base")]
    assert [line.split(" | ")[0] for line in paper] == ["| RoB-base FT\\* (paper)", "| RoB-base LoRA (paper)"]
    assert "| 90.2 |" in paper[0] and "| 89.7±.7 |" in paper[1]

    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["curves_mrpc.png", "rank_mrpc.png"]  # no lora_vs_full.png: no full fine-tuning run here
    for name in pngs:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.slow
def test_parallel_jobs_finish_every_cell(tmp_path, capfd):
    from lorafit.run import RunDir
    from lorafit.sweep import find_grid
    from lorafit.sweep.runner import job_threads

    grid = load_grid(find_grid("smoke"))
    grid.output_dir = str(tmp_path / "sweep")
    lines: list[str] = []
    cells = run_sweep(grid, jobs=2, echo=lines.append)
    assert len(cells) == 4 and all(RunDir(c.path).is_finished() for c in cells)
    assert sum(line.endswith(": finished") for line in lines) == 4
    assert [c.name for c in cells] == [c.name for c in expand(grid)]
    assert {RunDir(c.path).train_config().num_threads for c in cells} == {job_threads(2)}
    # Workers share this terminal: no interleaved Transformers load/save bars from them.
    assert "Loading weights" not in capfd.readouterr().err


def test_parallel_jobs_share_the_physical_cores_not_the_hyper_threads(monkeypatch):
    from lorafit.bench import env
    from lorafit.sweep.runner import job_threads

    monkeypatch.setattr(env, "physical_cores", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # two hyper-threads a core
    assert [job_threads(jobs) for jobs in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


def test_axis_flags_select_the_settings_bundles_that_set_their_field(capsys) -> None:
    def cells(*flags: str) -> list[tuple[str, float]]:
        grid = grid_from_args(build_parser().parse_args(["sweep", "--grid", "minilm-conv-lr-wide", *flags]))
        return [(c.name, c.config.learning_rate) for c in expand(grid)]

    # Each bundle of this grid names its task and method; a flag picks bundles, it does not add an
    # axis that every bundle would override.
    assert cells("--tasks", "rte", "--methods", "lora") == [("rte/lora-r8/seed0", 2.5e-4)]
    assert [name for name, _ in cells("--methods", "full")] == [
        "mrpc/full/seed0", "cola/full/seed0", "rte/full/seed0", "sst2/full/seed0", "stsb/full/seed0"]
    # A field no bundle sets is still an axis: every kept bundle runs at each value.
    assert cells("--tasks", "rte", "--seeds", "1,2") == [
        ("rte/lora-r8/seed1", 2.5e-4), ("rte/lora-r8/seed2", 2.5e-4), ("rte/full/seed1", 1e-5), ("rte/full/seed2", 1e-5)]
    assert main(["sweep", "--grid", "minilm-conv-lr-wide", "--tasks", "qnli"]) == 2
    assert capsys.readouterr().err.strip() == ("lorafit: error: --tasks qnli: no settings bundle of the grid has task "
                                               "qnli (its bundles have cola, mrpc, rte, sst2, stsb)")
