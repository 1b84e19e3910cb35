"""The forecast task: reading series, the M4 metrics and baselines, no look-ahead, the CLI verbs."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit.cli.main import main
from rnnkit.common.errors import UsageError
from rnnkit.tasks.forecast import baselines as bl
from rnnkit.tasks.forecast.data import from_values, read_csv

QUICK = ["--threads", "1", "--device", "cpu", "--no-plot", "--progress", "lines", "--steps", "40"]


def seasonal(n: int = 160, m: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 50 + 0.1 * t + 5 * np.sin(2 * np.pi * t / m) + rng.normal(0, 0.3, n)


def write_monthly(path: Path, values: np.ndarray) -> Path:
    lines = ["month,sales,note"] + [f"{2000 + i // 12}-{i % 12 + 1:02d},{v:.4f},x" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- reading ------------------------------------------------------------------------------------------
def test_a_weekly_file_with_an_empty_value_and_a_missing_week_reads_as_a_regular_series(tmp_path):
    f = tmp_path / "w.csv"
    f.write_text("date,co2\n20010106,1.0\n20010113,\n20010120,3.0\n20010203,5.0\n")
    s = read_csv(f)
    assert (s.freq, s.period, s.filled) == ("week", 52, 2)
    assert s.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # the empty cell and the missing week interpolated
    assert s.dates == ["2001-01-06", "2001-01-13", "2001-01-20", "2001-01-27", "2001-02-03"]
    assert s.next_dates(2) == ["2001-02-10", "2001-02-17"]


def test_a_year_by_month_table_reads_as_one_monthly_series(tmp_path):
    f = tmp_path / "t.csv"
    months = ",".join(m.upper() for m in ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep",
                                          "oct", "nov", "dec"])
    f.write_text(f'"YEAR",{months}\n1990,' + ",".join(str(i) for i in range(12)) + "\n1991," +
                 ",".join(str(12 + i) for i in range(12)) + "\n")
    s = read_csv(f)
    assert (s.freq, s.period, len(s)) == ("month", 12, 24)
    assert s.values.tolist() == list(range(24)) and s.dates[0] == "1990-01" and s.dates[-1] == "1991-12"
    assert s.next_dates(1) == ["1992-01"]


def test_csv_mistakes_are_one_line_errors_naming_the_place(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("year,value,other\n2000,1\n2001,abc\n")
    with pytest.raises(UsageError, match="several columns \\(value, other\\); choose one with --column"):
        read_csv(f)
    with pytest.raises(UsageError, match=r"bad.csv, line 3: column 'value' is not numeric \('abc'\)"):
        read_csv(f, column="value")
    with pytest.raises(UsageError, match="has no column 'price'"):
        read_csv(f, column="price")


# ---- metrics and baselines ---------------------------------------------------------------------------
def test_smape_and_mase_follow_the_m4_definitions():
    y, f = np.array([10.0, 20.0]), np.array([12.0, 15.0])
    assert bl.smape(y, f) == pytest.approx(100 * (2 / 22 + 5 / 35))
    history = np.array([1.0, 2.0, 4.0, 7.0, 11.0])  # seasonal differences at m=2: 3, 5, 7
    assert bl.mase(y, f, history, m=2) == pytest.approx(3.5 / 5.0)
    assert bl.origins(100, 6) == [94, 88, 82, 76, 70]


def test_seasonal_naive_repeats_the_last_season_and_linear_continues_a_clean_pattern():
    x = seasonal(n=120, seed=1)
    np.testing.assert_array_equal(bl.seasonal_naive(x, 15, 12), np.concatenate([x[-12:], x[-12:-9]]))
    clean = 50 + 0.1 * np.arange(140) + 5 * np.sin(2 * np.pi * np.arange(140) / 12)
    f = bl.linear(clean[:130], 10, 12, alpha=1e-6)
    np.testing.assert_allclose(f, clean[130:], atol=1e-3)


def test_a_horizon_too_long_for_the_series_is_refused():
    with pytest.raises(UsageError, match="horizon 30 is too long for the series of 160 values"):
        rnnkit.train("forecast", values=seasonal().tolist(), horizon=30, steps=1, out=None, progress="lines")


@pytest.mark.skipif(not bl._statsmodels(), reason="statsmodels is not installed")
def test_statsmodels_baselines_forecast_h_values():
    # a long season takes ARIMA's quickest path (one ARMA(1,1) on the seasonal differences); the AIC
    # searches of the other paths take tens of seconds and run in tools/forecast_benchmark.py
    x = seasonal(n=120, m=26)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence notes on a short series
        for name in ("ets", "arima", "theta"):
            f = bl.baselines()[name](x, 4, 26)
            assert f.shape == (4,) and np.isfinite(f).all(), name
            assert np.abs(f - x[-26:-22]).max() < 10  # near the series' last season, not off to nowhere


# ---- the task ------------------------------------------------------------------------------------------
def test_the_network_never_trains_on_a_value_at_or_after_the_first_rolling_origin(tmp_path):
    x = seasonal()
    changed = x.copy()
    origin = len(x) - 5 * 6
    changed[origin:] += 100.0  # only the held-out part differs
    losses = []
    for name, series in (("a", x), ("b", changed)):
        rnnkit.train("forecast", values=series.tolist(), horizon=6, period=12, steps=15, seed=3,
                                baselines=False, out=str(tmp_path / name), threads=1, progress="lines",
                                plot=False, log_every=1)
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["train_loss"] for r in rows if "train_loss" in r])
        setup = json.loads((tmp_path / name / "forecast_setup.json").read_text())
        assert setup["train_end"] == origin
    assert losses[0] == losses[1]


def test_train_forecast_then_forecast_and_eval_from_the_command_line(tmp_path, capsys):
    data = write_monthly(tmp_path / "sales.csv", seasonal())
    run = tmp_path / "run"
    assert main(["train", "forecast", "--data", str(data), "--column", "sales", "--horizon", "6",
                 "--no-baselines", "--out", str(run), *QUICK]) == 0
    err = capsys.readouterr().err
    assert "| rnnkit (gru) |" in err and "rolling MASE" in err
    for name in ("forecast.md", "forecast.json", "forecast.png", "forecast_setup.json"):
        assert (run / name).is_file(), name
    assert main(["forecast", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["2013-05", "2013-06", "2013-07", "2013-08", "2013-09", "2013-10"]
    assert all(math.isfinite(float(line.split(",")[1])) for line in lines)
    assert main(["forecast", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"dates", "median", "q0.1", "q0.9"} and len(doc["median"]) == 6
    assert all(lo <= hi for lo, hi in zip(doc["q0.1"], doc["q0.9"]))
    longer = write_monthly(tmp_path / "longer.csv", seasonal(n=172))
    assert main(["forecast", str(run), "--data", str(longer)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("2014-05,")
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"loss", "mase", "smape", "rolling_mase", "rolling_smape"} <= set(metrics)
    # after 40 steps from the least-squares start, clearly better than repeating the last value
    naive = bl.score(read_csv(data, "sales").values, 6, 12, bl.naive)["rolling_mase"]
    assert metrics["rolling_mase"] < naive


def test_forecast_from_python_on_a_list(tmp_path):
    model, summary = rnnkit.train("forecast", values=seasonal().tolist(), horizon=6, period=12, steps=30,
                                  out=str(tmp_path / "run"), threads=1, progress="lines", plot=False,
                                  baselines=False)
    assert "| rnnkit (gru) |" in summary["report"]
    run = rnnkit.load_run(tmp_path / "run")
    dates, values = run.task.forecast(run.model)
    assert dates == ["160", "161", "162", "163", "164", "165"] and values["median"].shape == (6,)
    later = from_values(seasonal(n=172).tolist(), period=12)
    assert run.task.forecast(run.model, later)[0][0] == "172"
    with pytest.raises(UsageError, match="unknown option\\(s\\) horizn"):
        rnnkit.train("forecast", values=[1.0] * 100, horizn=3)
    assert isinstance(model, torch.nn.Module)
