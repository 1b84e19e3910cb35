"""The flags of every command that uses a trained run (eval, predict, generate): which checkpoint, which
device, and the run's settings that may change after training.

    rnnkit eval RUN_DIR --checkpoint last --device cuda --beam 4

The run's task is known only once RUN_DIR is, so `run_task(argv)` reads it from the command line
before the parser is built; the task config's resumable fields (a sort run's `--beam`, an lm run's
`--eval-chars`) then become flags whose default is the run's own value.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from rnnkit.cli.flags import add_dataclass_flags, given_fields
from rnnkit.common.errors import UsageError
from rnnkit.engine.config import from_dict
from rnnkit.tasks.base import Task, option


@dataclass(frozen=True)
class RunOptions:
    checkpoint: Literal["best", "last"] = option("best", "which checkpoint to use (best falls back to last "
                                                         "when no evaluation has finished)")
    device: Literal["auto", "cpu", "cuda"] = option("cpu", "where to run the model (auto: cuda when available)")


def add_run_flags(parser: argparse.ArgumentParser, device: str = "cpu") -> None:
    """--checkpoint and --device; `device` is this command's default (eval: auto, the others: cpu)."""
    add_dataclass_flags(parser, RunOptions, defaults={"device": device})


def run_options(args: argparse.Namespace, device: str = "cpu") -> RunOptions:
    """The RunOptions of parsed `args`; `device` as given to `add_run_flags`."""
    return from_dict(RunOptions, {"device": device} | given_fields(args, RunOptions), source="flags")


def run_task(argv: list[str], add_flags: Callable[[argparse.ArgumentParser], None]) -> type[Task] | None:
    """The Task class of the run directory named on the command line `argv` (the tokens after the
    command), or None when there is none yet or it cannot be read (the command reports that when it
    runs). `add_flags` adds the command's own flags, so their values are not taken for RUN_DIR."""
    from rnnkit.engine.rundir import read_run
    from rnnkit.tasks.base import load_task_class

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("run_dir", nargs="?")
    pre.add_argument("rest", nargs="*")
    add_flags(pre)
    known, _ = pre.parse_known_args(argv)
    if not known.run_dir:
        return None
    try:
        info = read_run(known.run_dir)
        return load_task_class(info.task, info.task_class)
    except UsageError:
        return None


def settings(task_cls: type[Task]) -> list[str]:
    """The fields of the task's config that may change after training (declared `resumable`)."""
    return [f.name for f in dataclasses.fields(task_cls.Config) if f.metadata.get("resumable")]


def add_setting_flags(parser: argparse.ArgumentParser, task_cls: type[Task] | None) -> None:
    """The run's resumable task settings as flags, defaulting to the run's values."""
    names = settings(task_cls) if task_cls is not None else []
    if names:
        add_dataclass_flags(parser, task_cls.Config, f"{task_cls.name} run settings", only=names,
                            defaults=dict.fromkeys(names, "the run's"))


def load_selected_run(args: argparse.Namespace, device: str = "cpu"):
    """`load_run(args.run_dir)` with the checkpoint and device the flags chose, and the task's config
    updated with the run settings given on the command line."""
    from rnnkit.engine.rundir import load_run

    options = run_options(args, device)
    loaded = load_run(args.run_dir, checkpoint=options.checkpoint, device=options.device)
    task = loaded.task
    changed = {k: v for k, v in given_fields(args, type(task.config)).items() if k in settings(type(task))}
    if changed:
        try:
            task.config = dataclasses.replace(task.config, **changed)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
    return loaded
