"""Command-line flags: those derived from dataclass fields (``lorafit train`` and ``lorafit sweep``), and
``--precision`` of the commands that run a trained model.

A field ``learning_rate`` is the flag ``--learning-rate``; booleans are ``--flag/--no-flag``
switches, ``Literal`` fields take their choices, and list fields take comma-separated values.
Defaults stay with the dataclass (flags that are not given are absent from the namespace).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin


def flag_name(field_name: str) -> str:
    """The flag of a field: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + field_name.replace("_", "-")


def split_commas(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the items of a comma-separated list, blanks dropped."""
    return [s.strip() for s in text.split(",") if s.strip()]


def comma_list(kind: Callable[[str], Any], what: str, allow_empty: bool = True) -> Callable[[str], list[Any]]:
    """An argparse ``type`` for comma-separated values of ``kind`` (``what`` names them in errors)."""

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(s) for s in split_commas(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    parse.__name__ = f"comma-separated {what}"
    return parse


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                            skip: set[str] | frozenset[str] = frozenset()) -> None:
    """One flag per dataclass field; defaults are left to the dataclass (argparse.SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = flag_name(f.name)
        tp = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # a help text that explains its default says it once
            help_text += f" (default: {default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif get_origin(tp) is Literal:
            parser.add_argument(flag, choices=get_args(tp), default=argparse.SUPPRESS, help=help_text)
        elif get_origin(tp) is list:
            item = get_args(tp)[0]
            parser.add_argument(flag, type=comma_list(item, f"{item.__name__} values"), default=argparse.SUPPRESS,
                                metavar="A,B", help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=help_text)


# What --precision of eval, predict and submit accepts: "trained" is what the model trained in
# (lorafit.inference.inference_precision). Here, not there, so that building the parser stays light.
INFERENCE_PRECISIONS = ("trained", "auto", "fp32", "bf16")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--device`` of the commands that run a trained model (eval, predict, submit)."""
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="trained",
                        help="what the model computes in: 'trained' (default: the precision it trained in, "
                             "as recorded with it; fp32 where nothing is recorded, or where it trained in fp16 "
                             "and runs on the CPU), 'auto' (bf16 where the hardware multiplies bf16 natively), "
                             "'fp32' or 'bf16' (autocast)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs: auto (default: a GPU when there is one), cpu or cuda")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lorafit submit`` (:func:`lorafit.submit.run_submit_cli`)."""
    parser.add_argument("paths", nargs="+", metavar="RUN", help="run, adapter or merged model directories, "
                        "one per GLUE task")
    parser.add_argument("--output", default="glue_submission.zip", help="the zip to write "
                        "(default: glue_submission.zip)")
    parser.add_argument("--data-dir", help="GLUE-layout folder with the test files of tasks that are not "
                        "vendored (MNLI, QNLI, QQP)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_inference_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing zip")
