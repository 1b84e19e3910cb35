"""The forecast task: an RNN that reads a numeric series and forecasts its next H values.

    rnnkit train forecast --data co2.csv --column co2 --horizon 13
    rnnkit forecast RUN                 the next H values after the end of the training data
    rnnkit eval RUN --data longer.csv   the held-out metrics on another file with the same column

Protocol (the M4 competition's conventions; see baselines.py): the series' last 5 H values are the
rolling origins' test windows, stepping back by H from the end. The network is trained only on
windows that end before the earliest origin, so no model sees a value at or after any origin it is
scored at; at each origin it reads the L values just before it. It is scored at the single origin
(the last H values held out) and over the 5 rolling origins (the headline), beside the baselines,
all on the same split, in one table (`forecast.md`, `forecast.json`) and a plot (`forecast.png`).

The periodic evaluation's `loss` (which picks the best checkpoint) is the error on training windows
only: the held-out origins are reported, never used to choose anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write, atomic_write_text
from rnnkit.tasks.base import Task, device_of, option, shard_range, step_generator
from rnnkit.tasks.cell_spec import resolve_cell
from rnnkit.tasks.forecast import baselines as bl
from rnnkit.tasks.forecast.data import Series, from_values, read_csv
from rnnkit.tasks.forecast.model import ForecastNet, pinball
from rnnkit.tasks.regularisers import RegulariserOptions

HORIZONS = {"year": 6, "quarter": 8, "month": 18, "week": 13, "day": 14}  # M4's horizons
ARTIFACT = "forecast_setup.json"


@dataclass(frozen=True)
class ForecastConfig(RegulariserOptions):
    data: str | None = option(
        None, "CSV file: a date column and value columns, or a year x month table", metavar="FILE"
    )
    column: str | None = option(None, "the value column to forecast (needed when the file has several)", metavar="NAME")
    values: tuple[float, ...] = option((), "the series itself, instead of --data (from Python: a list)")
    horizon: int | None = option(
        None,
        "values to forecast (default: M4's horizon for the frequency: year 6, quarter 8, month 18, week 13, day 14)",
        metavar="H",
    )
    period: int | None = option(
        None,
        "season length (default: M4's for the frequency: year 1, quarter 4, month 12, week 52, day 7)",
        metavar="M",
    )
    window: int | None = option(
        None,
        "recent values the network reads (default: the best of a few lengths "
        "for a linear model on the training part's own rolling origins)",
        metavar="L",
    )
    hidden: int = option(32, "recurrent hidden size")
    cell: Literal["gru", "lstm"] = option("gru", "recurrent cell")
    dropout: float = option(0.0, "dropout before the output layer")
    scaling: Literal["window", "series"] = option(
        "window",
        "unit of each input window (after subtracting its "
        "last value): its own standard deviation, so "
        "shapes read alike at any amplitude, or the "
        "series' mean absolute step",
    )
    quantiles: tuple[float, ...] = option(
        (0.1, 0.9), "quantiles forecast beside the median (the interval drawn in forecast.png)"
    )
    batch_size: int = option(64, "windows per step, summed over all processes")
    baselines: bool = option(True, "score the baselines beside the network when training ends")

    def __post_init__(self):
        if self.horizon is not None and self.horizon < 1:
            raise UsageError(f"--horizon must be at least 1, got {self.horizon}")
        if any(not 0 < q < 1 for q in self.quantiles):
            raise UsageError(f"--quantiles must lie strictly between 0 and 1, got {self.quantiles}")
        if self.hidden < 1 or self.batch_size < 1:
            raise UsageError("--hidden and --batch-size must be at least 1")
        self.check_regularisers(resolve_cell(self.cell))


class ForecastTask(Task):
    name = "forecast"
    Config = ForecastConfig
    items_name = "windows"
    train_defaults: ClassVar[dict[str, Any]] = {
        "steps": 400,
        "lr": 3e-3,
        "warmup_steps": 20,
        "weight_decay": 1e-4,
        "eval_every": 100_000,
        "log_every": 50,
    }

    def __init__(self, config: ForecastConfig, run_dir: Path, setup: dict[str, Any] | None = None):
        super().__init__(config, run_dir)
        self.series = load_series(config)
        self.setup = setup or plan(self.series, config)
        self.fresh = setup is None
        self.seed = 0
        self.report_text: str | None = None
        self.table: dict[str, dict[str, float]] = {}
        s = self.setup
        self.train_values = self.series.values[: s["train_end"]]
        X, Y = bl.windows(self.train_values, s["window"], s["horizon"])
        if len(X) < 2:
            raise UsageError(
                f"{self.where()}: too few values before the first rolling origin to train on "
                f"({len(self.train_values)} for a {s['window']}-step window and horizon {s['horizon']})"
            )
        self.z, self.target = self.relative(X, Y)
        self.phase = torch.tensor(
            (np.arange(len(X))[:, None] + np.arange(s["window"])) % max(s["period"], 1), dtype=torch.float32
        )

    @classmethod
    def write_data(cls, data: Any, directory: Path) -> str:
        """In-memory numbers (a list, an array, a tensor) as a one-column CSV file."""
        values = np.asarray(data, dtype=np.float64).reshape(-1)
        path = Path(directory) / "series.csv"
        atomic_write_text(path, "value\n" + "".join(f"{v!r}\n" for v in values.tolist()))
        return str(path)

    def where(self) -> str:
        return self.config.data or "the series"

    # ---- run directory ---------------------------------------------------------------------------
    def save_artifacts(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / ARTIFACT, json.dumps(self.setup, indent=2) + "\n")

    @classmethod
    def from_run_dir(cls, config: ForecastConfig, run_dir: Path) -> ForecastTask:
        path = Path(run_dir) / ARTIFACT
        if not path.is_file():
            raise UsageError(f"{run_dir} is not a forecast run ({ARTIFACT} missing)")
        return cls(config, run_dir, setup=json.loads(path.read_text()))

    # ---- model and training ----------------------------------------------------------------------
    def window_scale(self, X: np.ndarray) -> np.ndarray:
        """(K, 1) unit of each window: the series' mean absolute step, or with --scaling window the
        window's own standard deviation (floored at a tenth of the series' unit)."""
        unit = self.setup["scale"]
        if self.config.scaling == "series":
            return np.full((len(X), 1), unit)
        return np.maximum(X.std(axis=1, keepdims=True), 0.1 * unit)

    def relative(self, X: np.ndarray, Y: np.ndarray | None = None):
        """Windows (K, L) and targets (K, H) relative to each window's last value, in its unit."""
        last, scale = X[:, -1:], self.window_scale(X)
        z = torch.tensor((X - last) / scale, dtype=torch.float32)
        return (z, None) if Y is None else (z, torch.tensor((Y - last) / scale, dtype=torch.float32))

    def build_model(self) -> nn.Module:
        c, s = self.config, self.setup
        self.seed = torch.initial_seed()  # the trainer seeded torch with --seed just before
        model = ForecastNet(
            s["window"], s["horizon"], s["period"], c.hidden, c.cell, c.quantiles, c.dropout, regularisers=c
        )
        if self.fresh:
            model.init_autoregression(self.z, self.target)
        return model

    def train_batch(self, step: int, rank: int, world_size: int) -> Any:
        rows = shard_range(self.config.batch_size, rank, world_size)
        idx = torch.randint(0, len(self.z), (self.config.batch_size,), generator=step_generator(self.seed, step))
        idx = idx[rows.start : rows.stop]
        return self.z[idx], self.phase[idx], self.target[idx]

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        z, phase, target = batch
        return pinball(model(z, phase), target, self.config.quantiles), len(z)

    # ---- forecasting -----------------------------------------------------------------------------
    def predict(self, model: nn.Module, history: np.ndarray, start_offset: int = 0) -> dict[str, np.ndarray]:
        """The next H values after `history` (whose first value is `start_offset` steps after the
        training series' first): {"median": (H,), "q0.1": (H,), ...} in the series' units."""
        s = self.setup
        L, m = s["window"], max(s["period"], 1)
        if len(history) < L:
            raise UsageError(f"forecasting needs at least the last {L} values, got {len(history)}")
        x = np.asarray(history[-L:], dtype=np.float64)[None]  # (1, L)
        z, _ = self.relative(x)
        first = start_offset + len(history) - L
        phase = torch.tensor(((first + np.arange(L)) % m)[None], dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            out = model(z.to(device_of(model)), phase.to(device_of(model)))[0].double().cpu().numpy()  # (H, Q)
        values = x[0, -1] + self.window_scale(x)[0, 0] * out
        result = {"median": values[:, 0]}
        for k, q in enumerate(self.config.quantiles, start=1):
            result[f"q{q:g}"] = values[:, k]
        return result

    def forecast(self, model: nn.Module, series: Series | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
        """(dates, {"median": values, "q0.1": ..., ...}) for the H steps after the end of `series`
        (default: the training data)."""
        series = series or self.series
        return series.next_dates(self.setup["horizon"]), self.predict(model, series.values, self.offset(series))

    def offset(self, series: Series) -> int:
        """Steps from the training series' first date to `series`' first date (season positions)."""
        start, freq = self.setup.get("start"), self.setup.get("freq")
        if not start or freq == "step" or series.freq != freq or not series.dates:
            return 0
        return _steps_between(start, series.dates[0], freq)

    def evaluate(self, model: nn.Module, data: str | None = None, options: Any = None) -> dict[str, float]:
        s = self.setup
        series = self.series if data is None else read_csv(data, self.config.column or s.get("column"), s["period"])
        # training windows only (the held-out origins never pick a checkpoint): at most 512, evenly spaced
        pick = np.unique(np.linspace(0, len(self.z) - 1, min(512, len(self.z))).astype(int))
        z, phase, target = self.z[pick], self.phase[pick], self.target[pick]
        device = device_of(model)
        loss = float(pinball(model(z.to(device), phase.to(device)), target.to(device), self.config.quantiles))
        return {"loss": loss, **self.score(model, series)}

    def score(self, model: nn.Module, series: Series) -> dict[str, float]:
        H, m = self.setup["horizon"], self.setup["period"]
        offset = self.offset(series)
        bl.check_horizon(len(series), H, m, self.setup["window"], self.where())
        return bl.score(
            series.values, H, m, lambda o: self.predict(model, series.values[:o], offset)["median"], by_origin=True
        )

    # ---- the end of training: the table and the plot --------------------------------------------
    def on_end(self, model: nn.Module) -> str | None:
        """Score the network and the baselines on the same origins; write forecast.md, forecast.json
        and forecast.png into the run directory; return the table."""
        s, series = self.setup, self.series
        H, m = s["horizon"], s["period"]
        rows = {f"rnnkit ({self.config.cell})": self.score(model, series)}
        if self.config.baselines:
            for name, fn in bl.baselines().items():
                rows[name] = bl.score(series.values, H, m, fn)
        reference = rows.get("seasonal naive", {}).get("rolling_mase")
        for row in rows.values():
            row["relative"] = row["rolling_mase"] / reference if reference else float("nan")
        self.table = rows
        text = format_table(
            rows,
            f"{series.name}: {len(series)} values, {series.freq}, H={H}, m={m}, "
            f"window {s['window']}, {bl.ORIGINS} rolling origins",
        )
        atomic_write_text(self.run_dir / "forecast.md", text + "\n")
        atomic_write_text(self.run_dir / "forecast.json", json.dumps(rows, indent=2) + "\n")
        dates, fc = self.forecast(model)
        held = self.predict(model, series.values[: len(series) - H], self.offset(series))
        plot(series, H, held, dates, fc, self.run_dir / "forecast.png")
        self.report_text = text
        return text


def load_series(config: ForecastConfig) -> Series:
    if config.values and config.data:
        raise UsageError("give the series either as --data FILE or as --values, not both")
    if config.values:
        return from_values(config.values, config.column or "value", config.period or 1)
    if not config.data:
        raise UsageError("the forecast task needs a series: --data FILE.csv (and --column NAME), or --values")
    return read_csv(config.data, config.column, config.period)


def plan(series: Series, config: ForecastConfig) -> dict[str, Any]:
    """What the run fixes from the data at its start: horizon, season, window, training end, scale."""
    if series.freq not in HORIZONS and config.horizon is None:
        raise UsageError(f"{config.data or 'the series'} has no dates to infer a horizon from; give --horizon H")
    H = config.horizon or HORIZONS[series.freq]
    m = config.period or series.period
    bl.check_horizon(len(series), H, m, config.window or bl.lag_window(H, m), config.data or "the series")
    train_end = bl.origins(len(series), H)[-1]  # the earliest rolling origin
    L = config.window or bl.choose_window(series.values[:train_end], H, m)
    return {
        "horizon": H,
        "period": m,
        "window": L,
        "train_end": train_end,
        "scale": bl.level_scale(series.values[:train_end]),
        "freq": series.freq,
        "start": series.dates[0] if series.dates else None,
        "column": series.name,
        "filled": series.filled,
    }


def _steps_between(a: str, b: str, freq: str) -> int:
    import datetime as dt

    if freq == "year":
        return int(b[:4]) - int(a[:4])
    if freq in ("month", "quarter"):
        months = (int(b[:4]) - int(a[:4])) * 12 + int(b[5:7]) - int(a[5:7])
        return months // (3 if freq == "quarter" else 1)
    days = (dt.date.fromisoformat(b) - dt.date.fromisoformat(a)).days
    return days // (7 if freq == "week" else 1)


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
    lines = [
        title,
        "",
        "| model | MASE | sMAPE | rolling MASE | rolling sMAPE | rolling MASE / seasonal naive |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['mase']:.3f} | {r['smape']:.2f} | {r['rolling_mase']:.3f} | "
            f"{r['rolling_smape']:.2f} | {r['relative']:.3f} |"
        )
    return "\n".join(lines)


def plot(
    series: Series,
    horizon: int,
    held: dict[str, np.ndarray],
    dates: list[str],
    future: dict[str, np.ndarray],
    png: Path,
) -> None:
    """History, the held-out truth and the network's forecast of it, and the forecast after the end,
    each with its quantile interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    shown = min(n, max(8 * horizon, 4 * series.period, 60))
    t = np.arange(n - shown, n)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t, series.values[n - shown :], color="black", lw=1, label="history")
    ax.plot(np.arange(n - horizon, n), series.values[n - horizon :], color="tab:green", lw=2, label="held-out truth")
    for fc, start, color, label in (
        (held, n - horizon, "tab:blue", "forecast of the held-out part"),
        (future, n, "tab:red", "forecast"),
    ):
        steps = np.arange(start, start + horizon)
        ax.plot(steps, fc["median"], color=color, lw=2, label=label)
        bands = sorted(k for k in fc if k != "median")
        if len(bands) >= 2:
            ax.fill_between(steps, fc[bands[0]], fc[bands[-1]], color=color, alpha=0.2)
    ticks = np.linspace(n - shown, n + horizon - 1, 6).astype(int)
    all_dates = series.dates + dates
    ax.set_xticks(ticks, [all_dates[i] if i < len(all_dates) else "" for i in ticks])
    ax.set_title(f"{series.name}: the last {horizon} values held out, and the next {horizon}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
