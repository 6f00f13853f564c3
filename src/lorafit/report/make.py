"""Writing a report: the files into a folder, optionally spliced into a hand-written document;
and ``lorafit report``'s flags."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.io import atomic_write_bytes
from lorafit.paths import check_output
from lorafit.report.plots import plot_curves, plot_examples_seen, plot_lora_vs_full, plot_rank, plot_variants
from lorafit.report.results_csv import write_csv
from lorafit.report.rows import Row, build_rows, detect_sections, task_order
from lorafit.report.runs import find_runs, group_runs
from lorafit.report.tables import write_markdown
from lorafit.report.tuned_tables import Tuned, tune, write_tuned_markdown
from lorafit.report.tuning import check_tunable
from lorafit.settings import format_value

PLOT_PATTERNS = ("rank_*.png", "curves_*.png", "lora_vs_full.png", "examples_seen_*.png", "variants.png")


def _file_part(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in task)


@dataclass
class Report:
    """What :func:`make_report` wrote, and from how many runs."""

    files: dict[str, Path]
    runs: int
    groups: int


def make_report(paths: list[str | Path], output: str | Path | None = None,
                command: str | None = None, tune_field: str | None = None) -> Report:
    """Write results.csv, results.md and the plots into ``output``.

    With ``tune_field`` (e.g. ``"learning_rate"``), each configuration is shown at the value of that
    setting chosen per task (see :mod:`lorafit.report.tuning`), with the search tables beside it.
    """
    if tune_field is not None:
        check_tunable(tune_field)  # before reading any run: a typo is the user's to fix first
    runs = find_runs(paths)
    groups = group_runs(runs)
    rows = build_rows(groups)
    out = Path(output) if output else Path(paths[0]) / "report"
    # Inside a run or sweep folder is fine (the default): a report only adds files of its own.
    check_output("--output", out, [("DIR", p) for p in paths], allow_inside=True)
    if command is None:
        flags = ["--output", str(output)] if output else []
        flags += ["--tune", tune_field] if tune_field else []
        command = shlex.join(["lorafit", "report", *map(str, paths), *flags])

    tuned = tune(groups, tune_field) if tune_field else None
    images = _plots(rows, task_order({g.task for g in groups}), tuned)
    markdown = (write_tuned_markdown(tuned, rows, groups, command, list(images)) if tuned
                else write_markdown(rows, groups, command, list(images)))
    written = {}
    for name, data in [("results.csv", write_csv(runs).encode()), ("results.md", markdown.encode()),
                       *images.items()]:
        atomic_write_bytes(out / name, data)
        written[name] = out / name
    for pattern in PLOT_PATTERNS:  # plots of an earlier report whose data is gone, once the new ones are in
        for old in out.glob(pattern):
            if old.name not in written:
                old.unlink()
    return Report(written, len(runs), len(groups))


def _plots(rows: list[Row], tasks: list[str], tuned: Tuned | None) -> dict[str, bytes]:
    """The PNGs by file name. Tuned, the rows are those at the chosen values, and dev metric vs
    examples seen (which shows each seed) takes the place of the curves over epochs."""
    shown = tuned.rows if tuned else rows
    images: dict[str, bytes] = {}
    for task in tasks:
        if (png := plot_rank(task, shown)) is not None:
            images[f"rank_{_file_part(task)}.png"] = png
    if (png := plot_lora_vs_full(shown)) is not None:
        images["lora_vs_full.png"] = png
    variants = next((s for s in detect_sections(shown) if s.with_speed), None)
    if variants and (png := plot_variants(variants.rows)) is not None:
        images["variants.png"] = png
    for task in tasks:
        if tuned:
            cells = [(r.label, r.cells[task]) for r in tuned.rows if task in r.cells]
            series = [(f"{label}, {tuned.field}={format_value(tuned.choice(g).chosen)}", g) for label, g in cells]
            if (png := plot_examples_seen(task, series)) is not None:
                images[f"examples_seen_{_file_part(task)}.png"] = png
        elif (png := plot_curves(task, rows)) is not None:
            images[f"curves_{_file_part(task)}.png"] = png
    return images


BEGIN_MARK = "<!-- lorafit report: begin (generated; edits between these marks are overwritten) -->"
END_MARK = "<!-- lorafit report: end -->"
BLOCK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def marks(name: str | None = None) -> tuple[str, str]:
    """The begin and end lines of a document's generated block: the unnamed one, or ``name``'s
    (a document holding the reports of several studies gives each block a name)."""
    if name is None:
        return BEGIN_MARK, END_MARK
    return (f"<!-- lorafit report: begin {name} (generated; edits between these marks are overwritten) -->",
            f"<!-- lorafit report: end {name} -->")


def parse_into(value: str) -> tuple[Path, str | None]:
    """``--into FILE`` or ``--into FILE#NAME`` (the block named NAME)."""
    path, hash_sign, name = value.rpartition("#")
    if hash_sign and path and BLOCK_NAME.fullmatch(name):
        return Path(path), name
    return Path(value), None


def splice(text: str, results_md: str, prefix: str, name: str | None = None) -> str:
    """``text`` with its generated block (see :func:`marks`) holding ``results_md``, whose links
    are made relative to the document by ``prefix`` (the report folder, seen from the document).

    Raises:
        ValueError: the document does not hold the block's two marks, once each, in order.
    """
    begin, end = marks(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected one line {begin!r} followed by one line {end!r}")
    body = results_md.split("\n", 1)[1].strip()  # without its "# lorafit report" title
    body = re.sub(r"\]\(([^)/]+\.(?:png|csv))\)", lambda m: f"]({prefix}/{m.group(1)})", body)
    body = body.replace("`results.csv`", f"[`results.csv`]({prefix}/results.csv)")
    # Generated sections become subsections of the document's own.
    body = re.sub(r"^## ", "### ", body, flags=re.MULTILINE)
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{begin}\n\n{body}\n\n{end}{tail}"


def splice_into(document: str | Path, results_md: Path, name: str | None = None) -> None:
    """Put the generated tables and figures into a hand-written document, between its marks.

    The prose around the marks stays as written; everything between them is regenerated, so a
    published report never holds a hand-typed number. Image links are made relative to the
    document.
    """
    document = Path(document)
    where = f"--into {document}" + (f"#{name}" if name else "")
    try:
        text = document.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorafitError(f"{where}: file not found") from None
    prefix = Path(os.path.relpath(results_md.parent, document.parent)).as_posix()
    try:
        spliced = splice(text, results_md.read_text(encoding="utf-8"), prefix, name)
    except ValueError as e:
        raise LorafitError(f"{where}: {e}") from None
    atomic_write_bytes(document, spliced.encode())


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tables (results.csv, results.md) and plots (PNG) from finished runs found under the given run or "
        "sweep directories. Runs that differ only by seed are summarised by their median."
    )
    parser.add_argument("paths", nargs="+", metavar="DIR",
                        help="run or sweep directories (searched recursively for finished runs)")
    parser.add_argument("--output", metavar="DIR",
                        help="where to write the report (default: <first DIR>/report)")
    parser.add_argument("--into", metavar="FILE[#NAME]",
                        help="also put the tables and figures into this markdown file, between its "
                             "'lorafit report: begin/end' marks (FILE#NAME: between its "
                             "'lorafit report: begin NAME/end NAME' marks)")
    parser.add_argument("--tune", metavar="FIELD",
                        help="a setting searched per task (e.g. learning_rate): show each configuration at "
                             "the value where its search seed (normally 0) did best, as the median of every "
                             "seed run at that value, beside the search tables and a plot of dev metric vs "
                             "training examples seen")


def run_report_cli(args: argparse.Namespace) -> int:
    into = parse_into(args.into) if args.into else None
    report = make_report(args.paths, args.output, tune_field=args.tune)
    folder = next(iter(report.files.values())).parent
    if into:
        splice_into(into[0], report.files["results.md"], into[1])
    print(f"report of {report.runs} runs ({report.groups} configuration x task groups) written to {folder}: "
          f"{', '.join(report.files)}")
    return 0
