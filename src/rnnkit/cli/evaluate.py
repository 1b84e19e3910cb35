"""`rnnkit eval RUN_DIR [--data PATH] [--json] [task flags]`: the task's metrics for a trained run.

When RUN_DIR is given, its task adds its flags: the run settings its config marks resumable (sort's
`--beam`, lm's `--eval-chars`; default: the run's value) and, when the Task class declares a frozen
dataclass `EvalOptions`, its fields (sort's `--lengths 5 10 20`); the task's
`evaluate(model, data, options=EvalOptions(...))` receives them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from rnnkit.cli.command import Command
from rnnkit.cli.flags import add_dataclass_flags, given_fields
from rnnkit.cli.runs import add_run_flags, add_setting_flags, load_selected_run, run_task
from rnnkit.engine.config import from_dict


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory written by `rnnkit train`")
    _add_flags(parser)
    task_cls = run_task(argv, _add_flags)
    add_setting_flags(parser, task_cls)
    options = getattr(task_cls, "EvalOptions", None)
    if task_cls is not None and options is not None:
        add_dataclass_flags(parser, options, f"{task_cls.name} evaluation")
        parser.set_defaults(eval_options=options)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="evaluate on this file in the task's format instead of the validation split"
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_run_flags(parser, device="auto")


def run(args: argparse.Namespace) -> int:
    loaded = load_selected_run(args, device="auto")
    options_cls = getattr(args, "eval_options", None)
    extra = {}
    if options_cls is not None:
        extra["options"] = from_dict(options_cls, given_fields(args, options_cls), source="flags")
    with torch.no_grad():
        metrics = {k: float(v) for k, v in loaded.task.evaluate(loaded.model, args.data, **extra).items()}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{loaded.info.task} run {loaded.info.path}, {loaded.checkpoint.name} (step {loaded.step}), "
            f"{args.data or 'validation split'}:",
            file=sys.stdout,
        )
        for k, v in metrics.items():
            print(f"  {k:<20} {v:.6g}")
    return 0


EVAL = Command(add_arguments, run)
