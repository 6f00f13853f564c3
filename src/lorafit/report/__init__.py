"""``lorafit report``: tables and plots from run directories, read from disk only.

``lorafit report DIR...`` finds every finished run under the given directories (a
``summary.json`` with ``"status": "finished"``, next to its ``config.yaml``), groups the runs that
differ only by seed, and writes to ``--output`` (default ``<first DIR>/report``):

    results.csv        one row per run: settings, best dev metric and epoch, trainable parameters,
                       train time, speed, hardware, and the ``lorafit train`` command that reproduces it
    results.md         paper-style tables (median over seeds, spread, average over tasks), with the
                       paper's RoBERTa-base rows beside them, labelled as the paper's
    rank_<task>.png    dev metric against LoRA rank (log2 axis), one line per target set
    lora_vs_full.png   LoRA against full fine-tuning per task, with trainable-parameter counts
    curves_<task>.png  dev metric over training (from metrics.jsonl), one line per configuration

Nothing is typed in by hand except the paper's numbers (:data:`PAPER_ROWS`, with their source).
The output depends only on the run directories, so running the same command again regenerates
the same files.

Modules: ``runs`` (finished runs and their seed groups), ``rows`` (table rows and sections),
``paper`` (the paper's numbers), ``tables`` (results.md), ``results_csv``, ``plots``, and ``make``
(writing it all, splicing, the flags).
"""

from lorafit.report.make import (
    BEGIN_MARK,
    END_MARK,
    Report,
    add_report_arguments,
    make_report,
    run_report_cli,
    splice_into,
)
from lorafit.report.paper import PAPER_ROWS, PAPER_SOURCE, PAPER_TASKS, PaperRow
from lorafit.report.plots import plot_curves, plot_lora_vs_full, plot_rank
from lorafit.report.results_csv import CSV_COLUMNS, csv_rows, train_command, write_csv
from lorafit.report.rows import (
    Row,
    Section,
    build_rows,
    detect_sections,
    format_count,
    headline_lora,
    task_order,
)
from lorafit.report.runs import Group, Run, find_runs, group_runs, load_run
from lorafit.report.tables import markdown_table, paper_table, runs_table, write_markdown

__all__ = [
    "BEGIN_MARK", "CSV_COLUMNS", "END_MARK", "PAPER_ROWS", "PAPER_SOURCE", "PAPER_TASKS", "Group", "PaperRow",
    "Report", "Row", "Run", "Section", "add_report_arguments", "build_rows", "csv_rows", "detect_sections",
    "find_runs", "format_count", "group_runs", "headline_lora", "load_run", "make_report", "markdown_table",
    "paper_table", "plot_curves", "plot_lora_vs_full", "plot_rank", "run_report_cli", "runs_table",
    "splice_into", "task_order", "train_command", "write_csv", "write_markdown",
]
