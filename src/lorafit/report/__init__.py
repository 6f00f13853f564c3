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

With ``--tune FIELD`` (e.g. ``learning_rate``), configurations are shown at the value of FIELD
chosen per task by a one-seed search (:mod:`lorafit.report.tuning`): results.md then holds the
main table at the chosen values, the values chosen and their seed counts, the verdict on LoRA
against full fine-tuning, and the search tables; ``examples_seen_<task>.png`` (dev metric against
training examples seen, each seed faint) replaces ``curves_<task>.png``.

Nothing is typed in by hand except the paper's numbers (:data:`PAPER_ROWS`, with their source).
The output depends only on the run directories, so running the same command again regenerates
the same files.

Modules: ``runs`` (finished runs and their seed groups), ``rows`` (table rows and sections),
``paper`` (the paper's numbers), ``tables`` (results.md), ``tuning`` and ``tuned_tables`` (``--tune``),
``results_csv``, ``plots``, and ``make`` (writing it all, splicing into named blocks, the flags).
"""

from lorafit.report.make import (
    BEGIN_MARK,
    END_MARK,
    Report,
    add_report_arguments,
    make_report,
    marks,
    parse_into,
    run_report_cli,
    splice,
    splice_into,
)
from lorafit.report.paper import PAPER_ROWS, PAPER_SOURCE, PAPER_TASKS, PaperRow
from lorafit.report.plots import plot_curves, plot_examples_seen, plot_lora_vs_full, plot_rank
from lorafit.report.results_csv import CSV_COLUMNS, csv_rows, train_command, write_csv
from lorafit.report.rows import (
    Row,
    Section,
    build_rows,
    detect_sections,
    format_count,
    headline_lora,
    lora_kind,
    task_order,
)
from lorafit.report.runs import Group, Run, find_runs, group_runs, load_run
from lorafit.report.tables import markdown_table, paper_table, runs_table, write_markdown
from lorafit.report.tuned_tables import Tuned, tune, verdicts, write_tuned_markdown
from lorafit.report.tuning import Choice, check_tunable, tune_groups

__all__ = [
    "BEGIN_MARK", "CSV_COLUMNS", "END_MARK", "PAPER_ROWS", "PAPER_SOURCE", "PAPER_TASKS", "Choice", "Group",
    "PaperRow", "Report", "Row", "Run", "Section", "Tuned", "add_report_arguments", "build_rows", "check_tunable",
    "csv_rows", "detect_sections", "find_runs", "format_count", "group_runs", "headline_lora", "load_run",
    "lora_kind", "make_report", "markdown_table", "marks", "paper_table", "parse_into", "plot_curves",
    "plot_examples_seen", "plot_lora_vs_full", "plot_rank", "run_report_cli", "runs_table", "splice",
    "splice_into", "task_order", "train_command", "tune", "tune_groups", "verdicts", "write_csv",
    "write_markdown", "write_tuned_markdown",
]
