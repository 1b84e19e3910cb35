"""`rnnkit` entry point: a registry of subcommands, each loaded only when used.

    rnnkit train {classify,lm,sort} [flags]     train, or --resume RUN_DIR
    rnnkit eval RUN_DIR [--data PATH] [--json]  metrics of a trained run
    rnnkit generate / demo / predict / sort     task commands (cli/lm.py, cli/classify.py, cli/sort.py)
    rnnkit --version

User mistakes (unknown flags, bad values, missing or foreign run directories, UsageError from anywhere
below) end with one line on stderr and exit code 2; there is no traceback for them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rnnkit.cli.command import Command, CommandSpec
from rnnkit.common.errors import UsageError
from rnnkit.engine.rundir import rnnkit_version

# One line per command. Task authors add theirs here and write the module it points to.
COMMANDS: dict[str, CommandSpec] = {
    "train": CommandSpec("rnnkit.cli.train:TRAIN", "train a task, or continue a run with --resume RUN_DIR"),
    "eval": CommandSpec("rnnkit.cli.evaluate:EVAL", "evaluate a trained run on its validation data or --data"),
    "generate": CommandSpec("rnnkit.cli.lm:GENERATE", "sample text from a trained language model"),
    "demo": CommandSpec("rnnkit.cli.lm:DEMO", "the main job: train a language model on Python's own source for a few minutes"),
    "predict": CommandSpec("rnnkit.cli.classify:PREDICT", "classify texts with a trained classifier"),
    "sort": CommandSpec("rnnkit.cli.sort:SORT", "sort numbers with a trained seq2seq sorter"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `rnnkit train: error: ... (see --help)`, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_command(name: str) -> Command:
    module_name, _, attr = COMMANDS[name].target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"command {name!r} is not available: {e}") from None
    command = getattr(module, attr, None)
    if not isinstance(command, Command):
        raise UsageError(f"command {name!r}: {module_name}.{attr} is not a rnnkit Command")
    return command


def build_parser(argv: list[str]) -> Parser:
    parser = Parser(prog="rnnkit", description="Recurrent neural networks: train, evaluate and use them.")
    parser.add_argument("--version", action="version", version=f"rnnkit {rnnkit_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        if chosen is not None and argv[chosen] == name:
            command = load_command(name)
            command.add_arguments(p, argv[chosen + 1:])
            p.set_defaults(run=command.run, trailing=command.trailing)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            parser = build_parser(argv)
            args, extra = parser.parse_known_args(argv)
            if extra and getattr(args, "trailing", None) and not any(a.startswith("-") for a in extra):
                getattr(args, args.trailing).extend(extra)  # more TEXT / NUMBER items after a flag
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # argparse: --help, --version (0) or a one-line usage error (2)
            return e.code if isinstance(e.code, int) else 2
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"rnnkit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that cannot be read or written: their fix, one line
        print(f"rnnkit: error: {e.strerror or e}: {e.filename}" if e.filename else f"rnnkit: error: {e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
