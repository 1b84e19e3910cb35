"""`rnnkit predict RUN_DIR [TEXT ...] [--json]`: the class of each text, from a trained classify run.

With no TEXT, reads one text per line from stdin. Prints one line per text: the label name, or with
`--json` one object `{"label": ..., "probabilities": {name: p, ...}}`.

    rnnkit predict runs/classify-... "Stocks fall as oil hits a record"        -> Business
    printf 'Stocks fall\\nNew chip is out\\n' | rnnkit predict RUN_DIR --json
"""
from __future__ import annotations

import argparse
import json

from rnnkit.cli.command import Command
from rnnkit.cli.runs import add_run_flags, load_selected_run
from rnnkit.cli.stdin import stdin_lines
from rnnkit.common.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory written by `rnnkit train classify`")
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="texts to classify (default: one text per line from stdin)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per text: the label and the class probabilities")
    add_run_flags(parser)


def run(args: argparse.Namespace) -> int:

    loaded = load_selected_run(args)
    if loaded.info.task != "classify":
        raise UsageError(f"{loaded.info.path} is a {loaded.info.task!r} run; predict needs a classify run")
    where = "argument" if args.texts else "stdin, line"
    texts = list(args.texts) if args.texts else list(stdin_lines())
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise UsageError(f"{where} {number}: empty text")
    if not texts:
        return 0
    task = loaded.task
    probabilities = task.predict(loaded.model, texts)
    for row in probabilities.tolist():
        label = task.names[max(range(len(row)), key=row.__getitem__)]
        if args.json:
            print(json.dumps({"label": label, "probabilities": dict(zip(task.names, row))}))
        else:
            print(label)
    return 0


PREDICT = Command(add_arguments, run, trailing="texts")
