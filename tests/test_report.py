"""lorafit report: grouping over seeds, paper-style tables, results.csv, plots.

Real tiny runs (a 2 ranks x 2 seeds LoRA sweep and one full fine-tuning run, 3 CPU steps each)
check the report end to end. Hand-written run directories are used only for the aggregation
logic (medians, spreads, averages, which table a row lands in), where the numbers must be known.
"""

from __future__ import annotations

import csv
import json
import shlex
import statistics
from pathlib import Path

import pytest
from report_fakes import PNG, fake_run, table_line

from lorafit.cli import build_parser, main
from lorafit.config import TrainConfig
from lorafit.errors import LorafitError
from lorafit.report import (
    PAPER_ROWS,
    PAPER_TASKS,
    build_rows,
    detect_sections,
    find_runs,
    format_count,
    group_runs,
    make_report,
    train_command,
)
from lorafit.sweep import Grid, run_sweep


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- real runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_cell) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    run_sweep(Grid(str(root / "lora"), base=dict(tiny_cell), axes={"rank": [1, 2], "seed": [0, 1]}),
              echo=lambda s: None)
    run_sweep(Grid(str(root / "full"), base={**tiny_cell, "method": "full", "learning_rate": 5e-5},
                   axes={"seed": [0]}), echo=lambda s: None)
    return {"root": root, "lora": root / "lora", "full": root / "full"}


def test_report_on_real_runs(real) -> None:
    out = real["root"] / "report"
    report = make_report([real["lora"], real["full"]], out)
    assert (report.runs, report.groups) == (5, 3)
    assert sorted(report.files) == ["curves_mrpc.png", "lora_vs_full.png", "rank_mrpc.png", "results.csv", "results.md"]

    rows = read_csv(out / "results.csv")
    assert len(rows) == 5
    md = (out / "results.md").read_text(encoding="utf-8")
    for rank in (1, 2):
        summaries = [json.loads((real["lora"] / f"mrpc/lora-r{rank}/seed{s}/summary.json").read_text()) for s in (0, 1)]
        values = [100 * s["best_metric"] for s in summaries]
        median, spread = statistics.median(values), (max(values) - min(values)) / 2
        cell = f"{median:.1f}±" + f"{spread:.1f}".removeprefix("0")  # the paper's style: 89.7±.7
        line = table_line(md, f"all-MiniLM-L6-v2 LoRA r={rank} (query, value)")
        assert f"| {cell} |" in line
        # Trainable parameters as the paper counts them: the adapters (6 layers x 2 matrices x r x (384 + 384)).
        assert f"| {format_count(6 * 2 * rank * 768)} |" in line
        csv_rows = [r for r in rows if r["rank"] == str(rank)]
        assert sorted(float(r["best_metric"]) for r in csv_rows) == sorted(s["best_metric"] for s in summaries)
        assert {r["adapter_parameters"] for r in csv_rows} == {str(6 * 2 * rank * 768)}
    full = table_line(md, "all-MiniLM-L6-v2 FT")
    assert "| 22.7M |" in full
    # With a full fine-tuning run, the main comparison carries the paper's rows, in italics and labelled.
    assert "## Main comparison: LoRA vs full fine-tuning" in md
    table_line(md, "*RoB-base FT\\* (paper: Hu et al. 2022, Table 2)*")
    table_line(md, "*RoB-base LoRA (paper: Hu et al. 2022, Table 2)*")
    for name in ("curves_mrpc.png", "lora_vs_full.png", "rank_mrpc.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
        assert f"![{name[:-4]}]({name})" in md


def test_results_csv_commands_reproduce_each_run(real) -> None:
    runs = find_runs([real["root"]])
    assert len(runs) == 5
    for run in runs:
        argv = shlex.split(train_command(run.config))
        assert argv[:2] == ["lorafit", "train"]
        args = build_parser().parse_args(argv[1:])
        rebuilt = {f: getattr(args, f) for f in TrainConfig().to_dict() if hasattr(args, f)}
        cfg = TrainConfig(**rebuilt).to_dict()
        for key, value in run.config.items():
            if key not in ("progress", "resume", "overwrite"):  # how it ran, not what it trained
                assert cfg[key] == value, key


def test_report_regenerates_the_same_files(real, tmp_path: Path) -> None:
    first = make_report([real["root"]], tmp_path / "a", command="lorafit report X")
    second = make_report([real["root"]], tmp_path / "b", command="lorafit report X")
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_report_cli(real, tmp_path: Path, capsys) -> None:
    assert main(["report", str(real["lora"]), "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "report of 4 runs (2 configuration x task groups)" in out
    # No full fine-tuning run among these: no lora_vs_full.png.
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "curves_mrpc.png", "rank_mrpc.png", "results.csv", "results.md"]
    # The default output folder is <first DIR>/report.
    assert main(["report", str(real["full"])]) == 0
    assert (real["full"] / "report" / "results.md").is_file()


# -- aggregation on hand-written run directories ----------------------------------------------


def rows_of(root: Path):
    return build_rows(group_runs(find_runs([root])))


def test_median_and_half_range_over_seeds(tmp_path: Path) -> None:
    for seed, value in enumerate((0.80, 0.90, 0.84)):
        fake_run(tmp_path, seed=seed, value=value)
    (row,) = rows_of(tmp_path)
    group = row.cells["mrpc"]
    assert group.values == pytest.approx([80.0, 90.0, 84.0])
    assert (group.median, group.spread) == (pytest.approx(84.0), pytest.approx(5.0))
    md = (make_report([tmp_path], tmp_path / "r").files["results.md"]).read_text(encoding="utf-8")
    assert "| 84.0±5.0 | 84.0 |" in table_line(md, "all-MiniLM-L6-v2 LoRA r=8 (query, value)")
    assert "median over 3 seeds" in md and "(max − min) / 2" in md
    assert "Each measured cell is the median of 3 seeds." in md  # every table says how many seeds, even when all agree


def test_table_columns_in_paper_order_with_the_average_over_present_tasks(tmp_path: Path) -> None:
    for task, value in (("rte", 0.70), ("stsb", 0.88), ("cola", 0.50), ("mrpc", 0.86)):
        fake_run(tmp_path, task=task, value=value)
        fake_run(tmp_path, task=task, method="full", value=value + 0.01)
    fake_run(tmp_path, task="rte", method="full", value=0.75, seed=1)  # a second seed on one task only
    fake_run(tmp_path, task="mrpc", rank=4, value=0.81)  # a row with one task
    md = make_report([tmp_path], tmp_path / "r").files["results.md"].read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| Model & method | # trainable"))
    assert header == "| Model & method | # trainable | MRPC (Acc) | CoLA (MCC) | RTE (Acc) | STS-B (Pearson) | Avg |"
    lora = table_line(md, "all-MiniLM-L6-v2 LoRA r=8 (query, value)")
    assert lora.endswith("| 86.0 | 50.0 | 70.0 | 88.0 | 73.5 |")
    # One cell has two seeds, the others one: that cell says so, and a note under the table says the rest.
    full = table_line(md, "all-MiniLM-L6-v2 FT")
    assert full.endswith("| 87.0 | 51.0 | 73.0±2.0 (n=2) | 89.0 | 75.0 |")
    assert "Cells without (n=…) are the median of 1 seed." in md
    # The rank ablation shows only the task its rows share, so its averages compare ...
    r4 = table_line(md, "all-MiniLM-L6-v2 LoRA r=4 (query, value)")
    assert r4.endswith("| 36.9K | 81.0 | 81.0 |")
    assert "| 73.7K | 86.0 | 86.0 |" in md  # the r=8 row in that table: MRPC only
    # ... while in a table over all tasks a row with fewer tasks averages those it has, and says so.
    from lorafit.report import build_rows, find_runs, group_runs, markdown_table

    everything = markdown_table(build_rows(group_runs(find_runs([tmp_path]))))
    assert table_line(everything, "all-MiniLM-L6-v2 LoRA r=4 (query, value)").endswith(
        "| 81.0 | – | – | – | 81.0 (1 task) |")
    # The paper's rows beside ours, over the same columns (their Avg averages the shown tasks).
    paper = table_line(md, "*RoB-base LoRA (paper: Hu et al. 2022, Table 2)*")
    assert paper.endswith(f"| 89.7±.7 | 63.4±1.2 | 86.6±.7 | 91.5±.2 | {statistics.fmean([89.7, 63.4, 86.6, 91.5]):.1f} |")


def test_sections_main_comparison_rank_and_target_ablations(tmp_path: Path) -> None:
    for rank in (2, 8):
        fake_run(tmp_path, rank=rank, value=0.80 + rank / 100)
    fake_run(tmp_path, rank=8, targets=["query", "key"], value=0.7)
    fake_run(tmp_path, rank=4, targets=["query", "key", "value", "dense"], value=0.6)  # in no ablation
    fake_run(tmp_path, method="full", value=0.9)
    sections = {s.title: [r.label for r in s.rows] for s in detect_sections(rows_of(tmp_path))}
    assert sections == {
        "Main comparison: LoRA vs full fine-tuning": ["all-MiniLM-L6-v2 FT", "all-MiniLM-L6-v2 LoRA r=8 (query, value)"],
        "Rank ablation": ["all-MiniLM-L6-v2 LoRA r=2 (query, value)", "all-MiniLM-L6-v2 LoRA r=8 (query, value)"],
        "Target-module ablation": ["all-MiniLM-L6-v2 LoRA r=8 (query, value)", "all-MiniLM-L6-v2 LoRA r=8 (query, key)"],
        "Other configurations": ["all-MiniLM-L6-v2 LoRA r=4 (query, key, value, dense)"],
    }


def test_default_and_explicit_targets_are_one_configuration(tmp_path: Path) -> None:
    fake_run(tmp_path, seed=0, value=0.8)  # target_modules: null, resolved to query, value
    fake_run(tmp_path, seed=1, value=0.9, targets=["query", "value"])
    (row,) = rows_of(tmp_path)
    assert row.cells["mrpc"].seeds == [0, 1]


def test_a_swept_setting_labels_the_rows(tmp_path: Path) -> None:
    for lr, value in ((1e-4, 0.7), (5e-4, 0.8)):
        for seed in (0, 1):
            fake_run(tmp_path, seed=seed, value=value + seed / 100, learning_rate=lr)
    labels = [r.label for r in rows_of(tmp_path)]
    assert labels == ["all-MiniLM-L6-v2 LoRA r=8 (query, value), learning_rate=0.0001",
                      "all-MiniLM-L6-v2 LoRA r=8 (query, value), learning_rate=0.0005"]


def test_lora_variants_are_named_and_get_their_own_table(tmp_path: Path) -> None:
    variants = {"LoRA": {}, "rsLoRA": {"use_rslora": True}, "DoRA": {"use_dora": True},
                "LoRA+ x16": {"loraplus_lr_ratio": 16.0}, "PiSSA": {"init_lora_weights": "pissa"}}
    for i, settings in enumerate(variants.values()):
        for task in ("mrpc", "cola"):
            # Each variant at its own learning rate, as a study tunes them: the rate is labelled too.
            fake_run(tmp_path, task=task, value=0.7 + i / 100, learning_rate=(i + 1) * 1e-4, **settings)
    for task in ("mrpc", "cola"):
        fake_run(tmp_path, task=task, method="full", value=0.8, learning_rate=5e-5)
    rows = rows_of(tmp_path)
    assert [r.label for r in rows] == ["all-MiniLM-L6-v2 FT, learning_rate=5e-05"] + [
        f"all-MiniLM-L6-v2 {kind} r=8 (query, value), learning_rate={(i + 1) * 1e-4:g}"
        for i, kind in sorted(enumerate(variants), key=lambda p: (p[1] != "LoRA", p[1]))]
    sections = {s.title: [r.label.split(" r=")[0] for r in s.rows] for s in detect_sections(rows)}
    assert sections["Main comparison: LoRA vs full fine-tuning"] == [
        "all-MiniLM-L6-v2 FT, learning_rate=5e-05", "all-MiniLM-L6-v2 LoRA"]
    assert sections["LoRA variants"] == ["all-MiniLM-L6-v2 FT, learning_rate=5e-05"] + [
        f"all-MiniLM-L6-v2 {k}" for k in sorted(variants, key=lambda k: (k != "LoRA", k))]
    assert "Other configurations" not in sections
    md = make_report([tmp_path], tmp_path / "r").files["results.md"].read_text(encoding="utf-8")
    assert table_line(md, "all-MiniLM-L6-v2 DoRA r=8 (query, value), learning_rate=0.0003").endswith("| 72.0 | 72.0 | 72.0 |")


def test_the_variants_table_shows_what_each_variant_costs_in_speed(tmp_path: Path) -> None:
    speeds = [({}, 100.0), ({"use_dora": True}, 60.0), ({"init_lora_weights": "pissa"}, 90.0)]  # LoRA, DoRA, PiSSA
    for settings, speed in speeds:
        for task, slower in (("mrpc", 1.0), ("cola", 2.0)):
            run = fake_run(tmp_path, task=task, value=0.7, **settings)
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
            summary["examples_per_second"] = speed / slower
            (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    fake_run(tmp_path, task="mrpc", method="full", value=0.8)  # examples/s 100.0, on one task only
    md = make_report([tmp_path], tmp_path / "r").files["results.md"].read_text(encoding="utf-8")
    speed = md.split("## LoRA variants", 1)[1].split("\n## ", 1)[0].split("(examples/s)", 1)[1]
    assert table_line(speed, "all-MiniLM-L6-v2 LoRA r=8 (query, value)").endswith("| 100.0 | 50.0 | 1.00x |")
    assert table_line(speed, "all-MiniLM-L6-v2 DoRA r=8 (query, value)").endswith("| 60.0 | 30.0 | 0.60x |")
    assert table_line(speed, "all-MiniLM-L6-v2 PiSSA r=8 (query, value)").endswith("| 90.0 | 45.0 | 0.90x |")
    assert table_line(speed, "all-MiniLM-L6-v2 FT").endswith("| 100.0 | – | 1.00x |")
    assert "Ran on cpu: test CPU, 1 thread." in speed


def test_the_variants_verdict_ranks_by_gap_to_full_fine_tuning_and_weighs_it_against_the_seeds(tmp_path: Path) -> None:
    medians = {"FT": {"mrpc": 81, "cola": 41}, "LoRA": {"mrpc": 77, "cola": 37},
               "DoRA": {"mrpc": 80, "cola": 38}, "PiSSA": {"mrpc": 70, "cola": 30}}
    settings = {"FT": {"method": "full"}, "LoRA": {}, "DoRA": {"use_dora": True}, "PiSSA": {"init_lora_weights": "pissa"}}
    for kind, per_task in medians.items():
        for task, median in per_task.items():
            for seed, offset in enumerate((-1, 0, 1)):  # every cell spreads ±1 over its 3 seeds
                fake_run(tmp_path, task=task, seed=seed, value=(median + offset) / 100, **settings[kind])
    md = make_report([tmp_path], tmp_path / "r").files["results.md"].read_text(encoding="utf-8")
    verdict = md.split("**Which variant comes closest to full fine-tuning**", 1)[1].split("\n## ", 1)[0]
    assert "(mean over MRPC, CoLA, the tasks every row ran" in verdict
    # DoRA beats LoRA by 3 on MRPC (more than the two cells' spreads, 1 + 1) and by 1 on CoLA (less).
    assert [line for line in verdict.splitlines() if line.startswith("- ")] == [
        "- DoRA: −2.0 (MRPC −1.0, CoLA −3.0); against plain LoRA +2.0, beyond the seeds' spread on 1 of 2 tasks (MRPC)",
        "- LoRA: −4.0 (MRPC −4.0, CoLA −4.0)",
        ("- PiSSA: −11.0 (MRPC −11.0, CoLA −11.0); against plain LoRA −7.0, beyond the seeds' spread on 2 of 2 tasks "
        "(MRPC, CoLA)")]
    assert "no spread" not in verdict


def test_the_variants_plot_needs_full_fine_tuning_and_is_no_rank_series(tmp_path: Path) -> None:
    for task in ("mrpc", "cola"):
        fake_run(tmp_path / "v", task=task, value=0.70)
        fake_run(tmp_path / "v", task=task, value=0.72, use_dora=True)
    # LoRA and DoRA at one rank, no full fine-tuning: nothing to measure the gap against.
    assert sorted(make_report([tmp_path / "v"], tmp_path / "r1").files) == ["results.csv", "results.md"]
    for task in ("mrpc", "cola"):
        fake_run(tmp_path / "v", task=task, method="full", value=0.75)
    files = make_report([tmp_path / "v"], tmp_path / "r2").files
    assert "variants.png" in files and not any(name.startswith("rank_") for name in files)
    assert files["variants.png"].read_bytes().startswith(PNG)


def test_unfinished_and_duplicate_runs(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path / "a", value=0.8)
    fake_run(tmp_path / "a", seed=1, value=0.6, status="running")
    fake_run(tmp_path / "b", value=0.5)  # same settings and seed as a/...: counted once
    (row,) = rows_of(tmp_path)
    assert row.cells["mrpc"].values == [pytest.approx(80.0)]
    assert "counted once" in capsys.readouterr().err
    # Giving a run twice (directly and through its sweep) finds it once.
    assert len(find_runs([tmp_path / "a", next((tmp_path / "a").iterdir()) / "seed0"])) == 1


def test_plots_only_when_their_data_exists(tmp_path: Path) -> None:
    fake_run(tmp_path / "one", value=0.8)  # one LoRA run without metrics.jsonl: tables only
    assert sorted(make_report([tmp_path / "one"], tmp_path / "r1").files) == ["results.csv", "results.md"]
    fake_run(tmp_path / "two", rank=2, value=0.7, curve=[0.6, 0.7])
    fake_run(tmp_path / "two", rank=4, value=0.75, targets=["query", "key"])  # no series with 2 ranks
    fake_run(tmp_path / "two", task="rte", method="full", value=0.6)  # no LoRA run on rte
    out = tmp_path / "r2"
    (out / "rank_sst2.png").parent.mkdir()
    (out / "rank_sst2.png").write_bytes(PNG)  # left over from an earlier report: removed
    assert sorted(make_report([tmp_path / "two"], out).files) == ["curves_mrpc.png", "results.csv", "results.md"]
    assert sorted(p.name for p in out.iterdir()) == ["curves_mrpc.png", "results.csv", "results.md"]


def test_no_runs_is_an_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(LorafitError, match="no finished runs"):
        make_report([tmp_path])
    with pytest.raises(LorafitError, match="no such directory"):
        make_report([tmp_path / "missing"])
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("lorafit: error: report: ")


def test_paper_rows_are_the_papers_numbers() -> None:
    ft, lora = PAPER_ROWS
    assert ft.label == "RoB-base FT*" and ft.trainable == "125.0M" and lora.trainable == "0.3M"
    assert [ft.values[t] for t in PAPER_TASKS] == [87.6, 94.8, 90.2, 63.6, 92.8, 91.9, 78.7, 91.2]
    assert [lora.values[t] for t in PAPER_TASKS] == [87.5, 95.1, 89.7, 63.4, 93.3, 90.8, 86.6, 91.5]
    for row in PAPER_ROWS:  # the paper's Avg is the mean over its 8 tasks
        assert abs(statistics.fmean(row.values.values()) - row.average) <= 0.05 + 1e-9  # 86.35 prints as 86.4
    assert (ft.average, lora.average) == (86.4, 87.2)


def test_parameter_counts_read_like_the_paper() -> None:
    assert [format_count(n) for n in (124_647_170, 294_912, 73_728, 9_216, 770)] == [
        "124.6M", "0.3M", "73.7K", "9.2K", "770"]


def test_splice_into_keeps_the_prose_and_replaces_only_the_generated_part(tmp_path: Path) -> None:
    from lorafit.report import BEGIN_MARK, END_MARK, splice_into

    out = tmp_path / "docs" / "report"
    out.mkdir(parents=True)
    (out / "results.md").write_text("# lorafit report\n\n## Main\n\n| a |\n|---|\n| 1 |\n\n![rank_mrpc](rank_mrpc.png)\n"
                                    "Details in `results.csv`.\n")
    doc = tmp_path / "docs" / "reproduction.md"
    doc.write_text(f"# Title\n\nProse before.\n\n{BEGIN_MARK}\nold table\n{END_MARK}\n\nProse after.\n")
    splice_into(doc, out / "results.md")
    text = doc.read_text()
    assert text.startswith("# Title\n\nProse before.") and text.endswith("Prose after.\n")
    assert "old table" not in text and "### Main" in text and "| 1 |" in text
    assert "![rank_mrpc](report/rank_mrpc.png)" in text and "[`results.csv`](report/results.csv)" in text
    splice_into(doc, out / "results.md")  # idempotent
    assert doc.read_text() == text

    doc.write_text("no marks here\n")
    with pytest.raises(LorafitError, match="--into .*reproduction.md: expected one line"):
        splice_into(doc, out / "results.md")


def test_the_committed_reproduction_report_is_what_its_runs_give(tmp_path: Path, monkeypatch) -> None:
    # docs/reproduction.md promises that nothing in its tables is typed by hand: regenerating the
    # report from the committed run files must give the committed results.md and results.csv.
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # results.csv names runs by their path relative to the repository
    studies = [f"docs/reproduction/runs/{s}" for s in ("main", "rank", "targets", "head")]
    command = shlex.join(["lorafit", "report", *studies, "--output", "docs/reproduction"])
    report = make_report([Path(s) for s in studies], tmp_path, command=command)
    committed = repo / "docs" / "reproduction"
    for name in ("results.md", "results.csv"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (committed / name).read_text(encoding="utf-8"), name
    assert sorted(n for n in report.files if n.endswith(".png")) == sorted(p.name for p in committed.glob("*.png"))
    # The report spliced into docs/reproduction.md holds the same table rows.
    doc = (repo / "docs" / "reproduction.md").read_text(encoding="utf-8")
    rows = [line for line in (tmp_path / "results.md").read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    assert len(rows) > 40 and all(row in doc for row in rows)


TUNED_STUDIES = {  # block name in docs/reproduction.md -> its study folders, in `lorafit report` order
    "converged": ["lr-lora", "lr-full", "lr-wide", "head", "seeds-lora", "seeds-full", "ablation"],
    "variants": ["lr", "lr-wide", "seeds"],
}


@pytest.mark.parametrize("block", sorted(TUNED_STUDIES))
def test_the_committed_tuned_studies_are_what_their_runs_give(block: str, tmp_path: Path, monkeypatch) -> None:
    # The converged protocol and the variants study (docs/reproduction/<block>, and their blocks in
    # docs/reproduction.md) are generated with --tune learning_rate from every study folder that has
    # landed, in this order; the first folder (the search) is always there.
    from lorafit.report import splice

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    root = f"docs/reproduction/runs/{block}"
    names = TUNED_STUDIES[block]
    assert (repo / root / names[0]).is_dir()
    studies = [f"{root}/{s}" for s in names if (repo / root / s).is_dir()]
    command = shlex.join(["lorafit", "report", *studies, "--output", f"docs/reproduction/{block}",
                          "--tune", "learning_rate"])
    report = make_report([Path(s) for s in studies], tmp_path, command=command, tune_field="learning_rate")
    committed = repo / "docs" / "reproduction" / block
    for name in ("results.md", "results.csv"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (committed / name).read_text(encoding="utf-8"), name
    assert sorted(n for n in report.files if n.endswith(".png")) == sorted(p.name for p in committed.glob("*.png"))
    assert any(n.startswith("examples_seen_") for n in report.files)
    # Every generated block of docs/reproduction.md is byte for byte what its report gives: splicing
    # the regenerated results into the committed document changes nothing.
    doc = (repo / "docs" / "reproduction.md").read_text(encoding="utf-8")
    generated = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert splice(doc, generated, f"reproduction/{block}", block) == doc
    short = (repo / "docs" / "reproduction" / "results.md").read_text(encoding="utf-8")  # checked above
    assert splice(doc, short, "reproduction") == doc
