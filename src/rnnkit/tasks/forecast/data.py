"""A numeric time series read from a CSV file: dates, values, frequency, season length, gaps filled.

Three layouts are read:

    long     a date column and one or more value columns   date,co2 / 19580329,316.1 / ...
    yearly   a year column and a value column               YEAR,SUNACTIVITY / 1700,5 / ...
    wide     a row per year, a column per month             YEAR,JAN,...,DEC / 1950,23.1,24.2,...
             (read row by row, January to December, as one monthly series)

Dates may be ISO (2001-12-29), compact (20011229), year-month (2001-12) or years (2001). The
frequency is the most common step between dates (day, week, month, quarter, year); missing dates are
inserted, and missing values (empty cells, NA) are filled by linear interpolation between their
neighbours, so the series is regular. The season length `m` follows the M4 competition's
conventions for the frequency (year 1, quarter 4, month 12, week 52, day 7); `period=` overrides it.
"""
from __future__ import annotations

import csv
import datetime as dt
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnkit.common.errors import UsageError

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DATE_NAMES = {"date", "ds", "time", "timestamp", "period", "day", "week", "month", "year", "yyyymmdd"}
SEASON = {"year": 1, "quarter": 4, "month": 12, "week": 52, "day": 7}  # M4's seasonal periods
MISSING = {"", "na", "nan", "n/a", "null", "none", "-", "."}


@dataclass(frozen=True)
class Series:
    values: np.ndarray        # (N,) float64, regular steps, gaps filled
    dates: list[str]          # (N,) ISO dates (YYYY, YYYY-MM or YYYY-MM-DD), one per value
    freq: str                 # "year", "quarter", "month", "week", "day" or "step" (no dates)
    period: int               # season length m used by seasonal naive and MASE
    name: str                 # the value column's name
    filled: int = 0           # how many values were missing and interpolated

    def __len__(self) -> int:
        return len(self.values)

    def next_dates(self, h: int) -> list[str]:
        """The `h` dates that follow the last one."""
        return [_shift(self.dates[-1], self.freq, k) for k in range(1, h + 1)] if self.dates else \
            [str(len(self.values) + k) for k in range(h)]


def from_values(values, name: str = "value", period: int = 1, dates: list[str] | None = None,
                freq: str = "step") -> Series:
    """A Series from numbers in memory (a list, a NumPy array, a tensor); NaN gaps are interpolated."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise UsageError(f"series {name!r} is empty")
    arr, filled = _interpolate(arr, name)
    return Series(arr, list(dates) if dates else [str(i) for i in range(len(arr))], freq if dates else "step",
                  period, name, filled)


def read_csv(path: str | Path, column: str | None = None, period: int | None = None) -> Series:
    """Read `path` (see the module docstring); `column` picks the value column when there are several."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise UsageError(f"{path}: expected a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    lower = [h.lower() for h in header]
    if [h[:3] for h in lower[1:13]] == MONTHS and len(header) >= 13:
        return _wide(path, header, body, period)
    date_col = next((i for i, h in enumerate(lower) if h in DATE_NAMES), None)
    if date_col is None and _parse_date(body[0][0].strip()) is not None:
        date_col = 0
    candidates = [h for i, h in enumerate(header) if i != date_col]
    if column is None:
        if len(candidates) != 1:
            raise UsageError(f"{path} has several columns ({', '.join(candidates)}); choose one with --column NAME")
        column = candidates[0]
    if column not in header:
        raise UsageError(f"{path} has no column {column!r}; its columns are {', '.join(header)}")
    col = header.index(column)
    texts = [r[col].strip() if col < len(r) else "" for r in body]
    values = _numbers(texts, path, column)
    if date_col is None:
        return from_values(values, column, period or 1)
    dates = [_parse_date(r[date_col].strip()) if date_col < len(r) else None for r in body]
    for line, d in enumerate(dates, start=2):
        if d is None:
            raise UsageError(f"{path}, line {line}: {header[date_col]} {body[line - 2][date_col]!r} is not a date")
    return _regular(values, dates, path, column, period)  # type: ignore[arg-type]


# ---- parsing -------------------------------------------------------------------------------------
def _numbers(texts: list[str], path: Path, column: str) -> np.ndarray:
    out = np.empty(len(texts))
    for i, t in enumerate(texts):
        if t.lower() in MISSING:
            out[i] = np.nan
            continue
        try:
            out[i] = float(t)
        except ValueError:
            raise UsageError(f"{path}, line {i + 2}: column {column!r} is not numeric ({t!r})") from None
    if np.isnan(out).all():
        raise UsageError(f"{path}: column {column!r} has no values")
    return out


def _parse_date(text: str) -> tuple[dt.date, str] | None:
    """(date, precision) with precision "day", "month" or "year"; None when `text` is no date."""
    for fmt, precision in (("%Y-%m-%d", "day"), ("%Y%m%d", "day"), ("%Y/%m/%d", "day"), ("%Y-%m", "month"),
                           ("%Y", "year")):
        try:
            d = dt.datetime.strptime(text[:10] if precision == "day" and "-" in text else text, fmt).date()
        except ValueError:
            continue
        if precision == "year" and not (1000 <= d.year <= 2999 and len(text) == 4):
            return None
        return d, precision
    return None


def _wide(path: Path, header: list[str], body: list[list[str]], period: int | None) -> Series:
    texts, dates = [], []
    for line, row in enumerate(body, start=2):
        try:
            year = int(row[0])
        except ValueError:
            raise UsageError(f"{path}, line {line}: {header[0]} {row[0]!r} is not a year") from None
        for month in range(12):
            texts.append(row[month + 1].strip() if month + 1 < len(row) else "")
            dates.append((dt.date(year, month + 1, 1), "month"))
    values = _numbers(texts, path, "the month columns")
    while np.isnan(values[-1]):  # months after the last observation (a year not finished)
        values, dates = values[:-1], dates[:-1]
    return _regular(values, dates, path, path.stem, period)


def _months(d: dt.date) -> int:
    return d.year * 12 + d.month - 1


def _regular(values: np.ndarray, dates: list[tuple[dt.date, str]], path: Path, name: str,
             period: int | None) -> Series:
    precision = dates[0][1]
    days = [d for d, _ in dates]
    if any(b <= a for a, b in itertools.pairwise(days)):
        raise UsageError(f"{path}: dates must increase from row to row")
    if precision == "year":
        freq, index = "year", [d.year for d in days]
    elif precision == "month":
        steps = np.diff([_months(d) for d in days])
        freq = "quarter" if len(steps) and np.median(steps) == 3 else "month"
        unit = 3 if freq == "quarter" else 1
        index = [_months(d) // unit for d in days]
    else:
        gaps = np.diff([d.toordinal() for d in days])
        step = int(np.median(gaps)) if len(gaps) else 1
        if 28 <= step <= 31:
            freq, index = "month", [_months(d) for d in days]
        elif 360 <= step <= 366:
            freq, index = "year", [d.year for d in days]
        else:
            freq = "week" if step == 7 else "day" if step == 1 else "step"
            index = [(d.toordinal() - days[0].toordinal()) // step for d in days]
    start = index[0]
    full = np.full(index[-1] - start + 1, np.nan)
    full[[i - start for i in index]] = values
    series_dates = [_shift(_iso(days[0], freq), freq, k) for k in range(len(full))]
    if freq == "day" or freq == "week" or freq == "step":
        ordinals = np.diff([d.toordinal() for d in days])
        step_days = 7 if freq == "week" else 1 if freq == "day" else int(np.median(ordinals))
        series_dates = [(days[0] + dt.timedelta(days=step_days * k)).isoformat() for k in range(len(full))]
    full, filled = _interpolate(full, name)
    return Series(full, series_dates, freq, period or SEASON.get(freq, 1), name, filled)


def _iso(d: dt.date, freq: str) -> str:
    return str(d.year) if freq == "year" else f"{d.year:04d}-{d.month:02d}" if freq in ("month", "quarter") \
        else d.isoformat()


def _shift(date: str, freq: str, k: int) -> str:
    """The date `k` steps after ISO `date`."""
    if freq == "year":
        return str(int(date[:4]) + k)
    if freq in ("month", "quarter"):
        m = int(date[:4]) * 12 + int(date[5:7]) - 1 + k * (3 if freq == "quarter" else 1)
        return f"{m // 12:04d}-{m % 12 + 1:02d}"
    if freq in ("week", "day"):
        return (dt.date.fromisoformat(date) + dt.timedelta(days=k * (7 if freq == "week" else 1))).isoformat()
    return str(int(date) + k) if date.isdigit() else f"{date}+{k}"


def _interpolate(values: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    missing = np.isnan(values)
    if missing.all():
        raise UsageError(f"series {name!r} has no values")
    if not missing.any():
        return values, 0
    idx = np.arange(len(values))
    out = values.copy()
    out[missing] = np.interp(idx[missing], idx[~missing], values[~missing])
    return out, int(missing.sum())
