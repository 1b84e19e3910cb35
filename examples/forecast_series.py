"""Forecast a real series: train the forecast task on Mauna Loa's weekly CO2 and read its table.

    python examples/forecast_series.py [--data co2.csv] [--quick]

`--data` is a CSV file with a `date,co2` header (dates as YYYYMMDD, some weeks empty), such as the
weekly CO2 series statsmodels ships. Without it, a synthetic weekly series with a trend and a yearly
cycle stands in. The last 5 x 13 weeks are held out; the table sets the network beside the baselines.
"""
import argparse
import datetime as dt
import math
import tempfile
from pathlib import Path

import rnnkit

parser = argparse.ArgumentParser()
parser.add_argument("--data", default=None, help="a CSV file with date and co2 columns")
parser.add_argument("--quick", action="store_true", help="a few seconds, no statsmodels baselines")
args = parser.parse_args()

out = Path(tempfile.mkdtemp())
data = args.data
if data is None or not Path(data).is_file():
    data = out / "synthetic.csv"
    start = dt.date(1990, 1, 6)
    rows = [f"{(start + dt.timedelta(weeks=k)):%Y%m%d},{350 + 0.03 * k + 3 * math.sin(2 * math.pi * k / 52.18):.2f}"
            for k in range(600)]
    data.write_text("date,co2\n" + "\n".join(rows) + "\n")

model, summary = rnnkit.train("forecast", data=str(data), column="co2", horizon=13, out=str(out / "run"),
                              steps=60 if args.quick else 400, baselines=not args.quick, threads=1)
print(summary["report"])

run = rnnkit.load_run(out / "run")
dates, values = run.task.forecast(run.model)        # the 13 weeks after the end of the data
for date, value, low, high in zip(dates, values["median"], values["q0.1"], values["q0.9"]):
    print(f"{date}  {value:7.2f}  (80% interval {low:.2f} to {high:.2f})")
print(f"plot: {out / 'run' / 'forecast.png'}")
