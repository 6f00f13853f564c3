"""The ``lorafit`` command line.

``lorafit train`` takes its flags from :class:`lorafit.config.TrainConfig` (a field
``learning_rate`` is the flag ``--learning-rate``; booleans are ``--flag/--no-flag`` switches),
so the CLI, the YAML recipes and the Python API share one schema. Bad input ends with one line
``lorafit: error: ...`` and exit code 2; ``--debug`` (or ``LORAFIT_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError, one_line, show_warnings_on_one_line, stdout_reader_gone
from lorafit.flags import add_dataclass_arguments

if TYPE_CHECKING:
    from lorafit.config import TrainConfig

def count(minimum: int = 1):
    """An argparse type: an integer of at least ``minimum`` (batch sizes, sample counts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


# -- commands ---------------------------------------------------------------------------------


def train_seeds(cfg: TrainConfig) -> dict[str, Any]:
    """One run per seed in ``<output_dir>/seed-<s>``, and the median of the best metrics."""
    from lorafit.distributed import is_main_process
    from lorafit.io import atomic_write_json
    from lorafit.run import RunDir
    from lorafit.train import train

    if not cfg.seeds:
        return train(cfg)
    root = Path(cfg.output_dir or Path("runs") / cfg.run_name().rsplit("-seed", 1)[0])
    summaries = []
    for seed in cfg.seeds:
        sub = cfg.replace(seed=seed, seeds=None, output_dir=str(root / f"seed-{seed}"))
        run = RunDir(Path(sub.output_dir))
        if sub.resume and not run.has_checkpoint():
            sub = sub.replace(resume=False)
        if cfg.resume and run.is_finished():
            summaries.append(run.summary())
            continue
        summaries.append(train(sub))
    values = [s["best_metric"] for s in summaries]
    result = {
        "status": "finished",
        "seeds": list(cfg.seeds),
        "metric": summaries[0]["metric"],
        "median": statistics.median(values),
        "values": values,
        "runs": [str(root / f"seed-{s}") for s in cfg.seeds],
    }
    if is_main_process():  # under torchrun / accelerate launch, one process writes
        atomic_write_json(root / "seeds_summary.json", result)
    return result


def cmd_train(args: argparse.Namespace) -> int:
    from lorafit.config import TrainConfig, make_config

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.process_entry:
        _start_again_on_the_allocator(args.recipe, overrides)
    from lorafit.distributed import is_main_process

    cfg = make_config(args.recipe, **overrides)
    summary = train_seeds(cfg)
    if not is_main_process():  # under torchrun / accelerate launch, one process reports
        return 0
    if cfg.seeds:
        print(f"{summary['metric']}: median {summary['median']:.4f} over seeds {cfg.seeds} "
              f"(values {', '.join(f'{v:.4f}' for v in summary['values'])})")
        print(f"runs: {', '.join(summary['runs'])}")
        return 0
    run = Path(cfg.output_dir or Path("runs") / cfg.run_name())
    best = summary["best_metrics"] or {}
    print(f"dev {summary['metric']}: {summary['best_metric']:.4f} (best epoch {summary['best_epoch']}); "
          + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k != summary["metric"]))
    print(f"{summary['examples_per_second']:.1f} examples/s, {summary['train_seconds']:.0f} s of training, "
          f"{summary['trainable_parameters']['trainable']:,} trainable parameters")
    saved = run / ("adapter" if cfg.method == "lora" else "model")
    print(f"{'adapter' if cfg.method == 'lora' else 'model'} saved to {saved}")
    return 0


def _start_again_on_the_allocator(recipe: str | None, overrides: dict[str, Any]) -> None:
    """Start ``lorafit train`` again on the allocator its settings ask for (``--allocator``).

    Before the config is built: its checks import torch, which the new process would import
    again. A value the checks would refuse is left to them, so that the message names the field.
    """
    from lorafit.allocator import LIBRARIES, relaunch_as_asked, run_device_type
    from lorafit.config import TrainConfig, load_recipe

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    asked = {**defaults, **(load_recipe(recipe) if recipe else {}), **overrides}
    if asked["allocator"] in ("auto", "system", *LIBRARIES) and asked["device"] in ("auto", "cpu", "cuda"):
        relaunch_as_asked(asked["allocator"], run_device_type(asked["device"]))


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafit.inference import evaluate_trained

    metrics = evaluate_trained(args.path, task=args.task, data_dir=args.data_dir, merged=not args.unmerged,
                               batch_size=args.batch_size, max_eval_samples=args.max_eval_samples,
                               precision=args.precision, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lorafit.inference import load_trained
    from lorafit.predict import predict_texts, read_inputs

    if args.split:
        return _predict_split(args)
    if bool(args.text) == bool(args.input):
        raise LorafitError("predict: give sentences with --text (repeatable) or a file with --input, not both")
    if args.text_pair and args.input:
        raise LorafitError("predict: --text-pair goes with --text; in an --input file the two sentences of a pair "
                           "share a line, a tab between them (or columns sentence1 and sentence2)")
    if args.text_pair and len(args.text_pair) != len(args.text):
        raise LorafitError(f"predict: {len(args.text_pair)} --text-pair for {len(args.text)} --text: "
                           "give one --text-pair for each --text")
    pairs = list(zip(args.text, args.text_pair or [None] * len(args.text))) if args.text else read_inputs(args.input)
    trained = load_trained(args.path, precision=args.precision, device=args.device)
    for record in predict_texts(trained, pairs, batch_size=args.batch_size):
        print(json.dumps(record))
    return 0


def _predict_split(args: argparse.Namespace) -> int:
    from lorafit.submit import write_test_predictions

    if args.text or args.input:
        raise LorafitError("predict: --split predicts a whole GLUE split; leave out --text and --input")
    if not args.output:
        raise LorafitError("predict: --split test needs --output DIR for the GLUE submission file(s)")
    for path in write_test_predictions(args.path, args.output, args.data_dir, args.batch_size, args.overwrite,
                                       args.precision, args.device):
        print(f"wrote {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from lorafit.submit import run_submit_cli

    return run_submit_cli(args)


def cmd_merge(args: argparse.Namespace) -> int:
    from lorafit.inference import export_merged

    out = export_merged(args.path, args.output, overwrite=args.overwrite)
    print(f"merged model written to {out} (loads with AutoModelForSequenceClassification.from_pretrained)")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from lorafit.data import encode_split, format_stats, get_task, load_split, split_stats
    from lorafit.models import load_tokenizer

    task = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    stats = {}
    for split in ("train", *task.eval_splits):
        raw = load_split(task, split, args.data_dir)
        stats[split] = split_stats(raw, encode_split(raw, tokenizer, args.max_length))
    print(format_stats(task, stats))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from lorafit.recipes import list_recipes, recipes_table

    print("\n".join(list_recipes()) if args.names else recipes_table())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorafit.sweep.cli import run_sweep_cli

    return run_sweep_cli(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from lorafit.bench.cli import run_bench_cli

    return run_bench_cli(args)


def cmd_report(args: argparse.Namespace) -> int:
    from lorafit.report.make import run_report_cli

    return run_report_cli(args)


# -- parser -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No prefix matching: "--lora" must not silently mean "--lora-dropout".
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2, like every other error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from lorafit.config import TrainConfig
    from lorafit.flags import add_inference_arguments, add_submit_arguments
    from lorafit.report.make import add_report_arguments
    from lorafit.sweep.cli import add_sweep_arguments

    parser = _Parser(prog="lorafit", description="LoRA fine-tuning of encoder models on GLUE.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model (LoRA or full) on a task")
    p.add_argument("--recipe", help="YAML recipe (shipped name like paper/roberta-base/mrpc, or a path); flags override it")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    text = ("evaluate a run directory or adapter on a task's dev set, in the precision it trained in (with "
            "--unmerged, a run directory gives the metric its training reported)")
    p = sub.add_parser("eval", help=text, description=text)
    p.add_argument("path", help="run directory, adapter directory or merged model directory")
    p.add_argument("--task", help="task to evaluate on (default: the one it was trained on)")
    p.add_argument("--data-dir", help="GLUE-layout folder for tasks that are not vendored")
    p.add_argument("--batch-size", type=count(), help="default: a run directory's eval batch size, else 64")
    p.add_argument("--max-eval-samples", type=count())
    p.add_argument("--unmerged", action="store_true", help="evaluate with the LoRA branch unmerged")
    add_inference_arguments(p)
    p.set_defaults(func=cmd_eval)

    text = "labels and probabilities (or scores) for new sentences (in the precision the model trained in)"
    p = sub.add_parser("predict", help=text, description=text)
    p.add_argument("path", help="run directory, adapter directory or merged model directory")
    p.add_argument("--text", action="append", help="a sentence (repeatable)")
    p.add_argument("--text-pair", action="append", help="second sentence for pair tasks (repeatable, in order)")
    p.add_argument("--input", help="a .txt (one example per line; tab separates a pair), .tsv, .csv or .jsonl file")
    p.add_argument("--batch-size", type=count(), default=64)
    p.add_argument("--split", choices=["test"], help="predict a GLUE test split in the GLUE server's format")
    p.add_argument("--output", help="with --split: folder for the task's submission file (SST-2.tsv, ...)")
    p.add_argument("--data-dir", help="with --split: GLUE-layout folder for test files that are not vendored")
    p.add_argument("--overwrite", action="store_true", help="with --split: replace existing files")
    add_inference_arguments(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("submit", help="zip GLUE test predictions of one run per task for the GLUE server")
    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("merge", help="export a merged plain Transformers model")
    p.add_argument("path", help="run directory or adapter directory")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("sweep", help="run a grid of experiments (resumable)")
    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables and plots from run or sweep directories")
    add_report_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="speed of lorafit vs HF Trainer + PEFT, side by side (train, infer, memory)")
    from lorafit.bench.cli import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser, metavar="COMMAND")
    s = data_sub.add_parser("stats", help="sizes, label balance and token lengths of a task")
    s.add_argument("task")
    s.add_argument("--model", default="minilm", help="tokenizer to count tokens with (default: minilm)")
    s.add_argument("--max-length", type=count(), default=512)
    s.add_argument("--data-dir")
    s.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("recipes", help="list the shipped recipes: model, task and source of each")
    p.add_argument("--names", action="store_true", help="only the names, one per line")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``lorafit`` command; returns the exit code (2 for bad input, with one line on stderr)."""
    argv_given, argv = argv, sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("LORAFIT_DEBUG", "") not in ("", "0")
    show_warnings_on_one_line()
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or a bad flag (2, its message already printed)
            return e.code if isinstance(e.code, int) else 2
        args.process_entry = argv_given is None  # this process is the command: it may start itself again
        code = args.func(args)
        sys.stdout.flush()  # a reader gone (`| head`) shows here rather than at exit, past this handler
        return code
    except LorafitError as e:
        if debug:
            raise
        print(f"lorafit: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the system refused: bad input too, named by its path
        if isinstance(e, BrokenPipeError) and stdout_reader_gone():
            return 1  # as other command-line tools, nothing to say: the reader asked for no more
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"lorafit: error: {where}{one_line(e.strerror or str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorafit: interrupted (the last checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
