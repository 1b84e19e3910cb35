"""`rnnkit eval RUN_DIR [--data PATH] [--json] [task flags]`: the task's metrics for a trained run.

A task may declare its own eval flags as a frozen dataclass `EvalOptions` on its Task class (fields via
`option()`, e.g. sort's `--n 5 10 15`); they appear here when RUN_DIR is such a run, and the task's
`evaluate(model, data, options=EvalOptions(...))` receives them.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from rnnkit.cli.command import Command
from rnnkit.cli.runs import add_run_flags, load_selected_run
from rnnkit.engine.config import add_dataclass_flags, from_dict, given_fields
from rnnkit.common.errors import UsageError
from rnnkit.engine.rundir import read_run
from rnnkit.tasks.base import load_task_class


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    _add_common(parser)
    pre = argparse.ArgumentParser(add_help=False)
    _add_common(pre, run_dir_optional=True)
    known, _ = pre.parse_known_args(argv)
    try:  # the run's task may add its own eval flags; an unreadable RUN_DIR is reported by run()
        task_cls = load_task_class(read_run(known.run_dir).task) if known.run_dir else None
    except UsageError:
        task_cls = None
    options = getattr(task_cls, "EvalOptions", None)
    if options is not None:
        add_dataclass_flags(parser, options, f"{task_cls.name} evaluation")
        parser.set_defaults(eval_options=options)


def _add_common(parser: argparse.ArgumentParser, run_dir_optional: bool = False) -> None:
    parser.add_argument("run_dir", nargs="?" if run_dir_optional else None,
                        help="run directory written by `rnnkit train`")
    parser.add_argument("--data", default=None,
                        help="evaluate on this file in the task's format instead of the validation split")
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
        print(f"{loaded.info.task} run {loaded.info.path}, {loaded.checkpoint.name} (step {loaded.step}), "
              f"{args.data or 'validation split'}:", file=sys.stdout)
        for k, v in metrics.items():
            print(f"  {k:<20} {v:.6g}")
    return 0


EVAL = Command(add_arguments, run)
