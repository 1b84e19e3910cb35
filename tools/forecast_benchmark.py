"""The forecast task on real series, several seeds: rolling MASE and sMAPE beside the baselines.

    python tools/forecast_benchmark.py DIR [--seeds 0 1 2] [--threads 1] [--option NAME VALUE ...]

DIR holds sunspots.csv (yearly, H=6), co2.csv (weekly, H=13) and elnino.csv (year x month, H=18). Prints
one table per series (the network's numbers are means over the seeds) and the geometric mean over the
series of each model's rolling MASE relative to seasonal naive's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rnnkit
from rnnkit.tasks.forecast import baselines as bl
from rnnkit.tasks.forecast.data import read_csv
from rnnkit.tasks.forecast.task import format_table

SERIES = {"sunspots": ("sunspots.csv", None, 6), "co2": ("co2.csv", "co2", 13), "elnino": ("elnino.csv", None, 18)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data_dir", metavar="DIR", help="folder with sunspots.csv, co2.csv and elnino.csv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--series", nargs="+", default=list(SERIES))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument(
        "--option",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a task or training option, e.g. --option hidden 16",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    options = {k: json.loads(v) if v[:1] in "0123456789-[tf" else v for k, v in args.option}
    relative: dict[str, dict[str, float]] = {}
    for name in args.series:
        file, column, horizon = SERIES[name]
        path = Path(args.data_dir) / file
        runs, start = [], time.monotonic()
        for seed in args.seeds:
            out = Path(tempfile.mkdtemp()) / f"{name}-{seed}"
            rnnkit.train(
                "forecast",
                data=str(path),
                column=column,
                horizon=horizon,
                seed=seed,
                baselines=False,
                out=str(out),
                progress="lines",
                plot=False,
                log_every=10_000,
                threads=args.threads,
                **options,
            )
            runs.append(json.loads((out / "forecast.json").read_text()))
        seconds = (time.monotonic() - start) / len(args.seeds)
        keys = ("mase", "smape", "rolling_mase", "rolling_smape")
        net = next(iter(runs[0]))
        rows = {net + f" (mean of {len(runs)} seeds)": {k: float(np.mean([r[net][k] for r in runs])) for k in keys}}
        spread = [r[net]["rolling_mase"] for r in runs]
        if not args.no_baselines:
            s = read_csv(path, column)
            for bname, fn in bl.baselines().items():
                rows[bname] = bl.score(s.values, horizon, s.period, fn)
        reference = rows.get("seasonal naive", {}).get("rolling_mase", float("nan"))
        for r in rows.values():
            r["relative"] = r["rolling_mase"] / reference
        print(
            format_table(
                rows,
                f"{name} (H={horizon}); network rolling MASE per seed "
                f"{', '.join(f'{x:.3f}' for x in spread)}; {seconds:.0f} s per training",
            )
        )
        print(flush=True)
        relative[name] = {k: r["relative"] for k, r in rows.items()}
    if len(relative) > 1 and not args.no_baselines:
        print("geometric mean over the series of rolling MASE / seasonal naive's:")
        for model in next(iter(relative.values())):
            values = [relative[s][model] for s in relative]
            print(f"  {model:32s} {math.exp(np.mean(np.log(values))):.3f}")


if __name__ == "__main__":
    sys.exit(main())
