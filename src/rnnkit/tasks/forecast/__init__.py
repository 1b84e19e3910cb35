"""Forecasting, the fourth pattern: an RNN that reads a numeric series and forecasts its next H values.

data.py reads the series (CSV layouts, gaps, frequency), model.py is the network, baselines.py the
metrics and the baselines it is scored beside, task.py the task that trains and reports it.
"""
from rnnkit.tasks.forecast.data import Series, from_values, read_csv
from rnnkit.tasks.forecast.task import ForecastConfig, ForecastTask

__all__ = ["ForecastConfig", "ForecastTask", "Series", "from_values", "read_csv"]
