"""`rnnkit train TASK [flags]`: flags come from the task's Config, TrainConfig and RunConfig."""
from __future__ import annotations

import argparse

from rnnkit.cli.command import Command
from rnnkit.cli.flags import add_dataclass_flags, given_fields
from rnnkit.common.errors import UsageError
from rnnkit.engine.trainer import RunConfig, TrainConfig, train
from rnnkit.tasks.base import load_task_class, task_names


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    names = task_names()
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True,
                                  help=f"one of {', '.join(names)}, or module:Class for a task of your own")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen and ":" in chosen and chosen not in names:
        names.append(chosen)  # a user's Task subclass by its import path
    for name in names:
        p = tasks.add_parser(name, help=f"train the {name} task",
                             description=f"Train the {name} task. Engine flags apply to every task.")
        if name == chosen:
            task_cls = load_task_class(name)
            try:
                add_dataclass_flags(p, task_cls.Config, f"{name} task")
                add_dataclass_flags(p, TrainConfig, "training", defaults=task_cls.train_defaults)
                add_dataclass_flags(p, RunConfig, "run directory")
            except argparse.ArgumentError as e:
                raise UsageError(f"task {name!r} declares a flag the engine already has: {e}") from None
            p.set_defaults(task_cls=task_cls)


def run(args: argparse.Namespace) -> int:
    run_config = RunConfig(**given_fields(args, RunConfig))
    return train(args.task, given_fields(args, args.task_cls.Config), given_fields(args, TrainConfig), run_config)


TRAIN = Command(add_arguments, run)
