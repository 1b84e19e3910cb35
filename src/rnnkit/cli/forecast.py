"""`rnnkit forecast RUN_DIR [--data FILE] [--json]`: the next H values after the end of a series.

The series is the run's training data, or FILE (a CSV with the same value column, for example the
same file with newer rows). One `date,value` line per step, or with `--json` one object
`{"dates": [...], "median": [...], "q0.1": [...], ...}` with the run's quantiles.

    rnnkit forecast runs/co2 --data co2-2002.csv
"""
from __future__ import annotations

import argparse
import json

from rnnkit.cli.command import Command
from rnnkit.cli.runs import add_run_flags, load_selected_run
from rnnkit.common.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory written by `rnnkit train forecast`")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="forecast after the end of this CSV file (default: the run's training data)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every quantile")
    add_run_flags(parser)


def run(args: argparse.Namespace) -> int:
    from rnnkit.tasks.forecast.data import read_csv

    loaded = load_selected_run(args)
    task = loaded.task
    if loaded.info.task != "forecast":
        raise UsageError(f"{loaded.info.path} is a {loaded.info.task!r} run, not a forecast run")
    series = None
    if args.data:
        series = read_csv(args.data, task.setup["column"] if not task.config.values else None, task.setup["period"])
    dates, values = task.forecast(loaded.model, series)
    if args.json:
        print(json.dumps({"dates": dates, **{k: [float(x) for x in v] for k, v in values.items()}}))
    else:
        for date, value in zip(dates, values["median"]):
            print(f"{date},{value:.6g}")
    return 0


FORECAST = Command(add_arguments, run)
