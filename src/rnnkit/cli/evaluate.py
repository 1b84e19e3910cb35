"""`rnnkit eval RUN_DIR [--data PATH] [--json]`: the task's metrics for a trained run."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from rnnkit.cli.command import Command
from rnnkit.engine.rundir import load_run


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory written by `rnnkit train`")
    parser.add_argument("--data", default=None,
                        help="evaluate on this file in the task's format instead of the validation split")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="which checkpoint to evaluate (default: best)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run the evaluation (default: auto)")


def run(args: argparse.Namespace) -> int:
    loaded = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device)
    with torch.no_grad():
        metrics = {k: float(v) for k, v in loaded.task.evaluate(loaded.model, args.data).items()}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{loaded.info.task} run {loaded.info.path}, {loaded.checkpoint.name} (step {loaded.step}), "
              f"{args.data or 'validation split'}:", file=sys.stdout)
        for k, v in metrics.items():
            print(f"  {k:<20} {v:.6g}")
    return 0


EVAL = Command(add_arguments, run)
