"""The flags that pick a trained run's checkpoint and device, shared by eval, predict, generate and sort.

    rnnkit eval RUN_DIR --checkpoint last --device cuda
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from rnnkit.engine.config import add_dataclass_flags, from_dict, given_fields
from rnnkit.tasks.base import option


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


def load_selected_run(args: argparse.Namespace, device: str = "cpu"):
    """`load_run(args.run_dir)` with the checkpoint and device the flags chose."""
    from rnnkit.engine.rundir import load_run

    options = run_options(args, device)
    return load_run(args.run_dir, checkpoint=options.checkpoint, device=options.device)
