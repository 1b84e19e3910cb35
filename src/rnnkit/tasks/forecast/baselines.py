"""Forecast accuracy (M4 conventions) and the baselines every forecast is set beside.

For a forecast f of the H values y that follow an origin, with the history x_1..x_n before it:

    sMAPE = 200/H * sum_h |y_h - f_h| / (|y_h| + |f_h|)                 (percent, 0..200)
    MASE  = mean_h |y_h - f_h| / (1/(n-m) * sum_{t>m} |x_t - x_{t-m}|)  (the in-sample seasonal-naive error)

Evaluation origins: the single origin holds out the last H points; the rolling origins are 5 origins
stepping back by H (n-H, n-2H, ..., n-5H), each forecaster seeing only the data before its origin.
The rolling mean is the headline, as one holdout is noisy.

Baselines, each a function (history, H, m) -> H values:

    naive           the last value, repeated
    seasonal naive  the value one season earlier (m steps back), repeated by season
    linear          a ridge regression per horizon step on a window of recent values, taken relative
                    to the window's last value (the direct strategy; it is often the one to beat)
    ets, arima, theta  statsmodels' exponential smoothing (damped additive trend, additive season
                    when m > 1), ARIMA chosen by AIC among a few orders (see `arima`) and the Theta
                    method; present when statsmodels is installed
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from rnnkit.common.errors import UsageError

Forecaster = Callable[[np.ndarray, int, int], np.ndarray]
ORIGINS = 5  # rolling origins, stepping back by H


def smape(y: np.ndarray, f: np.ndarray) -> float:
    denom = np.abs(y) + np.abs(f)
    ratio = np.divide(np.abs(y - f), denom, out=np.zeros_like(denom), where=denom > 0)
    return float(200.0 * ratio.mean())


def mase_scale(history: np.ndarray, m: int) -> float:
    """The in-sample seasonal-naive mean absolute error (falls back to m=1 for a short history)."""
    m = m if len(history) > m else 1
    scale = float(np.mean(np.abs(history[m:] - history[:-m])))
    return scale if scale > 0 else 1.0


def mase(y: np.ndarray, f: np.ndarray, history: np.ndarray, m: int) -> float:
    return float(np.mean(np.abs(y - f))) / mase_scale(history, m)


def origins(n: int, horizon: int, count: int = ORIGINS) -> list[int]:
    """The rolling origins (index of the first held-out value), latest first: n-H, n-2H, ..."""
    return [n - k * horizon for k in range(1, count + 1)]


def check_horizon(n: int, horizon: int, m: int, window: int, name: str = "the series") -> None:
    """A one-line error when the series is too short for H, 5 rolling origins and a training window."""
    if horizon < 1:
        raise UsageError(f"--horizon must be at least 1, got {horizon}")
    need = ORIGINS * horizon + window + horizon + max(m, 1)
    if n < need:
        raise UsageError(f"horizon {horizon} is too long for {name} of {n} values: 5 rolling origins and a "
                         f"{window}-step window need at least {need} (at most {_max_horizon(n, m, window)} here)")


def _max_horizon(n: int, m: int, window: int) -> int:
    return max(0, (n - window - max(m, 1)) // (ORIGINS + 1))


# ---- baselines ----------------------------------------------------------------------------------
def naive(history: np.ndarray, h: int, m: int) -> np.ndarray:
    return np.repeat(history[-1], h)


def seasonal_naive(history: np.ndarray, h: int, m: int) -> np.ndarray:
    if m <= 1 or len(history) < m:
        return naive(history, h, m)
    last = history[-m:]
    return np.array([last[k % m] for k in range(h)])


def lag_window(h: int, m: int) -> int:
    """The window of recent values the linear baseline and the network read: two seasons, and at
    least 3 horizons and 12 steps."""
    return max(2 * m, 3 * h, 12)


def choose_window(train: np.ndarray, h: int, m: int) -> int:
    """The window the network reads, chosen on the training part alone: the candidate lengths (H, 2H,
    3H, 4H, 6H, and m, 2m, 3m with a season; at least 12) are scored with the linear model over 5 rolling
    origins inside `train`, as the held-out origins score the models, and the best is kept."""
    candidates = sorted({max(12, h), 2 * h, 3 * h, 4 * h, 6 * h} | ({m, 2 * m, 3 * m} if m > 1 else set()))
    scores = {}
    for L in candidates:
        if len(train) >= ORIGINS * h + L + 2 * h + max(m, 1):
            scores[L] = score(train, h, m, lambda x, hh, mm, L=L: linear(x, hh, mm, window=L))["rolling_mase"]
    return min(scores, key=lambda L: scores[L]) if scores else lag_window(h, m)


def linear(history: np.ndarray, h: int, m: int, window: int | None = None, alpha: float = 1.0) -> np.ndarray:
    """Ridge regression per horizon step on the last `window` values, all relative to the window's
    last value and scaled by the history's mean absolute step."""
    L = window or lag_window(h, m)
    X, Y = windows(history, L, h)
    if len(X) < 2:
        return naive(history, h, m)
    scale = level_scale(history)
    Xr, Yr = (X - X[:, -1:]) / scale, (Y - X[:, -1:]) / scale
    A = np.hstack([Xr, np.ones((len(Xr), 1))])
    reg = alpha * np.eye(A.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    W = np.linalg.solve(A.T @ A + reg, A.T @ Yr)  # (L + 1, H)
    x = history[-L:]
    return x[-1] + scale * (np.append((x - x[-1]) / scale, 1.0) @ W)


def windows(x: np.ndarray, L: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (L inputs, h targets) pair inside `x`: shapes (K, L) and (K, h)."""
    K = len(x) - L - h + 1
    if K <= 0:
        return np.empty((0, L)), np.empty((0, h))
    idx = np.arange(K)[:, None]
    return x[idx + np.arange(L)], x[idx + L + np.arange(h)]


def level_scale(x: np.ndarray) -> float:
    """Mean absolute one-step change: the unit in which windows are given to the models."""
    s = float(np.mean(np.abs(np.diff(x)))) if len(x) > 1 else 1.0
    return s if s > 0 else 1.0


def _statsmodels() -> bool:
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


def ets(history: np.ndarray, h: int, m: int) -> np.ndarray:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    seasonal = "add" if m > 1 and len(history) >= 2 * m + 2 else None
    fit = ExponentialSmoothing(history, trend="add", damped_trend=True, seasonal=seasonal,
                               seasonal_periods=m if seasonal else None,
                               initialization_method="estimated").fit()
    return np.asarray(fit.forecast(h))


def arima(history: np.ndarray, h: int, m: int) -> np.ndarray:
    """The lowest-AIC model of a small fixed set: without a season, ARMA(2,1), AR(3), AR(9), ARMA(2,2)
    with a constant (differenced once when an ADF test cannot reject a unit root); with a season of up to
    24 steps, seasonal AR terms ((1,0,0)(1,0,0), (1,0,1)(1,0,0), (2,0,0)(1,0,1)); with a longer season
    (weekly data), ARMA(1,1) with a constant on the series differenced by one season."""
    from statsmodels.tsa.arima.model import ARIMA

    if m > 24 and len(history) >= 3 * m:
        diff = history[m:] - history[:-m]
        step = np.asarray(ARIMA(diff, order=(1, 0, 1), trend="c").fit().forecast(h))
        out = list(history)
        for k in range(h):
            out.append(out[-m] + step[k])
        return np.array(out[len(history):])
    if 1 < m <= 24 and len(history) >= 3 * m:
        candidates = [((1, 0, 0), (1, 0, 0, m)), ((1, 0, 1), (1, 0, 0, m)), ((2, 0, 0), (1, 0, 1, m))]
        trend = "c"
    else:
        from statsmodels.tsa.stattools import adfuller

        d = 0 if adfuller(history)[1] < 0.05 else 1
        candidates = [((p, d, q), (0, 0, 0, 0)) for p, q in ((2, 1), (3, 0), (9, 0), (2, 2))]
        trend = "c" if d == 0 else "t"
    best = None
    for order, seasonal in candidates:
        try:
            fit = ARIMA(history, order=order, seasonal_order=seasonal, trend=trend).fit()
        except (ValueError, np.linalg.LinAlgError):
            continue
        if best is None or fit.aic < best.aic:
            best = fit
    if best is None:
        raise ValueError("no ARIMA model could be fitted")
    return np.asarray(best.forecast(h))


def theta(history: np.ndarray, h: int, m: int) -> np.ndarray:
    from statsmodels.tsa.forecasting.theta import ThetaModel

    fit = ThetaModel(history, period=m if m > 1 else None, deseasonalize=m > 1 and len(history) >= 2 * m).fit()
    return np.asarray(fit.forecast(h))


def baselines() -> dict[str, Forecaster]:
    """The baselines available here, by name (statsmodels' three only when it is installed)."""
    table: dict[str, Forecaster] = {"naive": naive, "seasonal naive": seasonal_naive, "linear": linear}
    if _statsmodels():
        table |= {"ets": ets, "arima": arima, "theta": theta}
    return table


def score(values: np.ndarray, horizon: int, m: int, forecaster: Callable[..., np.ndarray],
          by_origin: bool = False) -> dict[str, float]:
    """MASE and sMAPE at the single origin and averaged over the rolling origins. `forecaster` is a
    baseline (history, H, m) -> H values, or with `by_origin` a function origin -> H values."""
    rows = []
    for origin in origins(len(values), horizon):
        history, truth = values[:origin], values[origin:origin + horizon]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels' convergence chatter
            try:
                f = forecaster(origin) if by_origin else forecaster(history, horizon, m)
            except (ValueError, np.linalg.LinAlgError):
                f = np.full(horizon, np.nan)
        f = np.asarray(f, dtype=np.float64)
        rows.append((mase(truth, f, history, m), smape(truth, f)))
    return {"mase": rows[0][0], "smape": rows[0][1],
            "rolling_mase": float(np.mean([r[0] for r in rows])),
            "rolling_smape": float(np.mean([r[1] for r in rows]))}
