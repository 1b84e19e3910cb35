"""`rnnkit sort RUN_DIR [NUMBER ...]`: print a trained sorter's output.

With numbers on the command line, prints one line. Without, reads one sequence per line from stdin
(numbers separated by spaces or commas) and prints one output line per input line, as each line
arrives. Numbers in the output are separated by single spaces. A bad line (not UTF-8, not a number, an
integer outside [0, V), longer than the model supports, empty) stops with a message naming it, exit code 2;
blank lines at the very end of the input are ignored, as they are in `rnnkit eval RUN --data FILE`.

    $ echo "5 3 9, 1" | rnnkit sort runs/sort-ptr
    1 3 5 9
"""
from __future__ import annotations

import argparse

from rnnkit.cli.command import Command
from rnnkit.cli.runs import add_run_flags, load_selected_run
from rnnkit.cli.stdin import stdin_lines


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory of a trained sort model")
    parser.add_argument("numbers", nargs="*", metavar="NUMBER",
                        help="one sequence to sort; without numbers, read one sequence per line from stdin")
    parser.add_argument("--beam", type=int, default=None, help="beam width (default: the run's --beam; 1 = greedy)")
    add_run_flags(parser)


def run(args: argparse.Namespace) -> int:
    from rnnkit.common.errors import UsageError
    from rnnkit.tasks.sort.task import sequence_lines

    if args.beam is not None and args.beam < 1:
        raise UsageError(f"--beam must be at least 1, got {args.beam}")
    loaded = load_selected_run(args)
    if loaded.info.task != "sort":
        raise UsageError(f"{loaded.info.path} is a {loaded.info.task!r} run, not a sort run")
    task, model = loaded.task, loaded.model
    if args.numbers:
        print(task.sort_line(model, " ".join(args.numbers), "command line", args.beam))
        return 0
    for number, line in sequence_lines(stdin_lines()):
        print(task.sort_line(model, line, f"line {number}", args.beam), flush=True)
    return 0


SORT = Command(add_arguments, run, trailing="numbers")
