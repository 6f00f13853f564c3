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
from lorafit.report.plots import plot_curves, plot_lora_vs_full, plot_rank
from lorafit.report.results_csv import write_csv
from lorafit.report.rows import build_rows, task_order
from lorafit.report.runs import find_runs, group_runs
from lorafit.report.tables import write_markdown

PLOT_PATTERNS = ("rank_*.png", "curves_*.png", "lora_vs_full.png")


def _file_part(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in task)


@dataclass
class Report:
    """What :func:`make_report` wrote, and from how many runs."""

    files: dict[str, Path]
    runs: int
    groups: int


def make_report(paths: list[str | Path], output: str | Path | None = None,
                command: str | None = None) -> Report:
    """Write results.csv, results.md and the plots into ``output``."""
    runs = find_runs(paths)
    groups = group_runs(runs)
    rows = build_rows(groups)
    out = Path(output) if output else Path(paths[0]) / "report"
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--output {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in PLOT_PATTERNS:  # plots of an earlier report whose data is gone
        for old in out.glob(pattern):
            old.unlink()
    if command is None:
        flags = ["--output", str(output)] if output else []
        command = shlex.join(["lorafit", "report", *map(str, paths), *flags])

    images: dict[str, bytes] = {}
    tasks = task_order({g.task for g in groups})
    for task in tasks:
        if (png := plot_rank(task, rows)) is not None:
            images[f"rank_{_file_part(task)}.png"] = png
    if (png := plot_lora_vs_full(rows)) is not None:
        images["lora_vs_full.png"] = png
    for task in tasks:
        if (png := plot_curves(task, rows)) is not None:
            images[f"curves_{_file_part(task)}.png"] = png

    written = {}
    for name, data in [("results.csv", write_csv(runs).encode()),
                       ("results.md", write_markdown(rows, groups, command, list(images)).encode()),
                       *images.items()]:
        atomic_write_bytes(out / name, data)
        written[name] = out / name
    return Report(written, len(runs), len(groups))


BEGIN_MARK = "<!-- lorafit report: begin (generated; edits between these marks are overwritten) -->"
END_MARK = "<!-- lorafit report: end -->"


def splice_into(document: str | Path, results_md: Path) -> None:
    """Put the generated tables and figures into a hand-written document, between its marks.

    The prose around the marks stays as written; everything between them is regenerated, so a
    published report never holds a hand-typed number. Image links are made relative to the
    document.
    """
    document = Path(document)
    try:
        text = document.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorafitError(f"--into {document}: file not found") from None
    if text.count(BEGIN_MARK) != 1 or text.count(END_MARK) != 1 or text.index(BEGIN_MARK) > text.index(END_MARK):
        raise LorafitError(f"--into {document}: expected one line {BEGIN_MARK!r} followed by one line {END_MARK!r}")
    body = results_md.read_text(encoding="utf-8").split("\n", 1)[1].strip()  # without its "# lorafit report" title
    prefix = Path(os.path.relpath(results_md.parent, document.parent)).as_posix()
    body = re.sub(r"\]\(([^)/]+\.(?:png|csv))\)", lambda m: f"]({prefix}/{m.group(1)})", body)
    body = body.replace("`results.csv`", f"[`results.csv`]({prefix}/results.csv)")
    # Generated sections become subsections of the document's own.
    body = re.sub(r"^## ", "### ", body, flags=re.MULTILINE)
    head, rest = text.split(BEGIN_MARK, 1)
    tail = rest.split(END_MARK, 1)[1]
    atomic_write_bytes(document, f"{head}{BEGIN_MARK}\n\n{body}\n\n{END_MARK}{tail}".encode())


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tables (results.csv, results.md) and plots (PNG) from finished runs found under the given run or "
        "sweep directories. Runs that differ only by seed are summarised by their median."
    )
    parser.add_argument("paths", nargs="+", metavar="DIR",
                        help="run or sweep directories (searched recursively for finished runs)")
    parser.add_argument("--output", metavar="DIR",
                        help="where to write the report (default: <first DIR>/report)")
    parser.add_argument("--into", metavar="FILE",
                        help="also put the tables and figures into this markdown file, between its "
                             "'lorafit report: begin/end' marks")


def run_report_cli(args: argparse.Namespace) -> int:
    report = make_report(args.paths, args.output)
    folder = next(iter(report.files.values())).parent
    if args.into:
        splice_into(args.into, report.files["results.md"])
    print(f"report of {report.runs} runs ({report.groups} configuration x task groups) written to {folder}: "
          f"{', '.join(report.files)}")
    return 0
