"""Which recurrent cell a task builds: a name from rnnkit's cell registry, or a cell of your own.

`--cell` takes a registry name (`rnnkit.CELLS`: lstm, gru, rnn, ...) or `MODULE:CLASS`, a GatedCell
subclass importable from the Python path or the current directory; the run's config.json records the
spec, so later commands (eval, predict, generate, --resume) import the same class again.

    rnnkit train lm --cell gru
    rnnkit train lm --cell my_cells:MGUCell        # my_cells.py in the current directory

>>> resolve_cell("lstm").__name__
'LSTMCell'
>>> layer = recurrent_layer("gru", 4, 8, num_layers=2)
>>> type(layer).__name__, layer.num_layers
('GRU', 2)
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from rnnkit.common.errors import UsageError
from rnnkit.core import CELLS, LAYERS, GatedCell, Recurrent
from rnnkit.tasks.base import option

_USER_CELL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def cell_choices() -> list[str]:
    """What `--cell` accepts, for the help: the registry's names, then MODULE:CLASS."""
    return [*CELLS, "MODULE:CLASS"]


def parse_cell(text: str) -> str:
    """The `--cell` text checked for its form (a registry name or MODULE:CLASS); ValueError otherwise."""
    if text in CELLS or _USER_CELL.match(text):
        return text
    raise ValueError(
        f"invalid choice: {text!r} (choose from {', '.join(CELLS)}, or MODULE:CLASS for a "
        f"GatedCell subclass of your own)"
    )


def cell_option(default: str, help: str) -> Any:
    """A config field for `--cell` (see the module docstring)."""
    return option(default, help, parse=parse_cell, choices=cell_choices)


def resolve_cell(spec: str) -> type[GatedCell]:
    """The cell class `spec` names: `CELLS[spec]`, or the class `MODULE:CLASS` imported. Anything else,
    or a class that is not a GatedCell subclass, is a one-line UsageError naming the spec."""
    if spec in CELLS:
        return CELLS[spec]
    module_name, colon, class_name = spec.partition(":")
    if not colon or not _USER_CELL.match(spec):
        raise UsageError(f"--cell {spec!r}: not a cell name ({', '.join(CELLS)}) nor MODULE:CLASS")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # a module beside the user, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(
            f"--cell {spec}: cannot import {module_name} ({e}); put it on PYTHONPATH or in the current directory"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"--cell {spec}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, GatedCell)):
        raise UsageError(f"--cell {spec}: {module_name}.{class_name} is not a GatedCell subclass")
    return cls


def recurrent_layer(spec: str, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs) -> Recurrent:
    """A multi-layer recurrent layer of the cell `spec`: the built-in LSTM / GRU / RNN layer for their
    names (torch.nn's classes and defaults), `Recurrent(cell, ...)` for any other cell."""
    if spec in LAYERS:
        return LAYERS[spec](input_size, hidden_size, num_layers, **kwargs)
    return Recurrent(resolve_cell(spec), input_size, hidden_size, num_layers, **kwargs)
