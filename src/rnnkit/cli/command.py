"""What a subcommand module provides: one `Command` object, referenced from `COMMANDS` in cli/main.py.

A task's own command (say `rnnkit generate` for lm) lives in its own module, e.g. cli/lm.py:

    from rnnkit.cli.command import Command

    def add_arguments(parser, argv):        # argv: the tokens after the command name (rarely needed)
        parser.add_argument("run_dir", help="run directory of a trained lm")
        parser.add_argument("--length", type=int, default=200, help="characters to generate")

    def run(args) -> int:                   # exit code; raise UsageError for user mistakes
        run = load_run(args.run_dir)        # rnnkit.engine.rundir.load_run: task + model from the run dir
        ...
        return 0

    GENERATE = Command(add_arguments, run)

and one line in COMMANDS: `"generate": CommandSpec("rnnkit.cli.lm:GENERATE", "sample text from an lm run")`.
The module is imported only when its command is used, so keep heavy imports inside `run` where cheap
`--help` matters.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    add_arguments: Callable[[argparse.ArgumentParser, list[str]], None]  # adds the command's flags
    run: Callable[[argparse.Namespace], int]  # does the work; returns the exit code
    # dest of a trailing positional list (`predict RUN TEXT...`) whose items may come before and after
    # flags (`predict RUN a --json b`); argparse alone stops filling it at the first flag
    trailing: str | None = None


@dataclass(frozen=True)
class CommandSpec:
    target: str  # "module:ATTRIBUTE" of the Command, imported only when this command runs
    help: str  # one line for `rnnkit --help`, available without importing the module
