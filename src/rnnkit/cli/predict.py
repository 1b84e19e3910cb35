"""`rnnkit predict RUN_DIR [INPUT ...]`: apply a trained run to inputs, one output line per input.

The same verb for every task that maps an input to an answer; the run's task decides what an input is:

    rnnkit predict runs/classify-... "Stocks fall as oil hits a record"      -> Business
    echo "5 3 9, 1" | rnnkit predict runs/sort-...                          -> 1 3 5 9

With no INPUT on the command line, inputs are read one per line from stdin and each answer is printed
as its line arrives. A language model generates rather than predicts: `rnnkit generate RUN_DIR`.
Each task's part lives in its own module (PREDICTORS); `--help` after RUN_DIR lists the task's flags.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rnnkit.cli.command import Command
from rnnkit.cli.flags import add_dataclass_flags, given_fields
from rnnkit.cli.runs import add_run_flags, add_setting_flags, load_selected_run, run_task
from rnnkit.common.errors import UsageError
from rnnkit.engine.config import from_dict


@dataclass(frozen=True)
class Predictor:
    inputs: str  # help of the INPUT arguments: what one input is
    run: Callable[[Any, list[str] | None, Any], int]  # (loaded run, inputs or None for stdin, options) -> exit code
    Options: type | None = None  # frozen dataclass of the task's own predict flags (fields via option())


# task name -> "module:ATTRIBUTE" of its Predictor, imported only when used
PREDICTORS: dict[str, str] = {
    "classify": "rnnkit.cli.classify:PREDICTOR",
    "sort": "rnnkit.cli.sort:PREDICTOR",
}
OTHER_VERBS = {"lm": "a language model generates text: rnnkit generate RUN_DIR"}


def predictor_for(task: str) -> Predictor:
    if task not in PREDICTORS:
        why = OTHER_VERBS.get(task, f"rnnkit predict works with {', '.join(PREDICTORS)} runs")
        raise UsageError(f"a {task!r} run has no predict; {why}")
    module_name, _, attr = PREDICTORS[task].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory written by `rnnkit train`")
    task_cls = run_task(argv, add_run_flags)
    predictor = predictor_for(task_cls.name) if task_cls is not None and task_cls.name in PREDICTORS else None
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=predictor.inputs
        if predictor
        else "the inputs, one per argument (default: one per line from stdin); what an input is depends on the run",
    )
    add_run_flags(parser)
    add_setting_flags(parser, task_cls)
    if task_cls is not None and predictor is not None and predictor.Options is not None:
        add_dataclass_flags(parser, predictor.Options, f"{task_cls.name} output")


def run(args: argparse.Namespace) -> int:
    from rnnkit.engine.rundir import read_run

    predictor = predictor_for(read_run(args.run_dir).task)  # before loading: a run without one fails fast
    loaded = load_selected_run(args)
    options = None
    if predictor.Options is not None:
        options = from_dict(predictor.Options, given_fields(args, predictor.Options), source="flags")
    return predictor.run(loaded, list(args.inputs) or None, options)


PREDICT = Command(add_arguments, run, trailing="inputs")
