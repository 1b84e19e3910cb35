"""`rnnkit` entry point: a registry of subcommands, each loaded only when used.

    rnnkit train {classify,lm,sort} [flags]     train, or --resume RUN_DIR
    rnnkit eval RUN_DIR [--data PATH] [--json]  metrics of a trained run
    rnnkit predict RUN_DIR [INPUT ...]          a classifier's labels, a sorter's sorted sequences
    rnnkit generate RUN_DIR [--prompt TEXT]     text sampled from a language model
    rnnkit demo                                 train a language model on Python's own source in minutes
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
    "predict": CommandSpec("rnnkit.cli.predict:PREDICT",
                           "apply a trained run to inputs: a classifier's labels, a sorter's sorted numbers"),
    "generate": CommandSpec("rnnkit.cli.lm:GENERATE", "sample text from a trained language model"),
    "forecast": CommandSpec("rnnkit.cli.forecast:FORECAST", "forecast the next values of a series with a trained run"),
    "export": CommandSpec("rnnkit.cli.export:EXPORT", "write a trained run's model as ONNX or a torch.export program"),
    "demo": CommandSpec("rnnkit.cli.lm:DEMO", "train a language model on Python's own source in a few minutes"),
}
# commands of earlier versions: old name -> new name; still run, with a warning, and are not listed
RENAMED_COMMANDS: dict[str, str] = {"sort": "predict"}


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
    if argv and argv[0] in RENAMED_COMMANDS:
        print(f"rnnkit: warning: `rnnkit {argv[0]}` is now `rnnkit {RENAMED_COMMANDS[argv[0]]}`", file=sys.stderr)
        argv[0] = RENAMED_COMMANDS[argv[0]]
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
