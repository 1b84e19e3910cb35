"""The recurrent regularisers as task options: `--input-dropout`, `--output-dropout`, `--weight-drop`,
`--zoneout` and `--recurrent-dropout`, one definition shared by every task with a recurrent layer.

A task's config inherits `RegulariserOptions` (its five fields, all 0 = off) and calls
`check_regularisers(cell_class)` in its `__post_init__`; its model passes the recurrent layer through
`regularised(layer, config)`, which returns the layer itself when all five are 0 (the model, its module
tree and its state_dict keys exactly as without these options, so older runs load) and otherwise wraps
it in `rnnkit.Regularised` (core/regularise.py: the equations, and which kernels apply what):

    input_dropout       variational dropout on the layer's input, one mask per sequence (Gal & Ghahramani 2016)
    output_dropout      the same on the layer's output
    weight_drop         DropConnect on every cell's recurrent weights weight_hh, one mask per training step
    zoneout             each unit keeps its previous state at a step with this probability (Krueger et al. 2016)
    recurrent_dropout   the previous output dropped where it enters the gates, one mask per sequence

All of them act in training only; in evaluation (eval, generate, predict, export) the plain layer runs.
Their masks come from torch's global generator, which the trainer seeds with `--seed` and saves in
every checkpoint, so a run is reproducible and `--resume` continues it exactly.

    rnnkit train lm --cell lstm --weight-drop 0.5 --output-dropout 0.25 --zoneout 0.1

>>> from rnnkit.core import LSTM
>>> cfg = RegulariserOptions(weight_drop=0.5, zoneout=0.1)
>>> type(regularised(LSTM(4, 8), cfg)).__name__, type(regularised(LSTM(4, 8), RegulariserOptions())).__name__
('Regularised', 'LSTM')
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from rnnkit.common.errors import UsageError
from rnnkit.core import GatedCell, ParallelScanCell, Regularised
from rnnkit.tasks.base import option

GROUP = "recurrent regularisers"


@dataclass(frozen=True)
class RegulariserOptions:
    """The five regularisers of a task's recurrent layer; a task's config inherits them."""

    input_dropout: float = option(
        0.0,
        "variational dropout on the recurrent layer's input: one mask per sequence, the same at every step",
        group=GROUP,
    )
    output_dropout: float = option(
        0.0,
        "variational dropout on the recurrent layer's output: one mask per sequence, the same at every step",
        group=GROUP,
    )
    weight_drop: float = option(
        0.0,
        "weight-drop (DropConnect) on each cell's recurrent weights weight_hh: one mask per training step, "
        "shared by the batch and every time step (not for mingru and minlstm, which have none)",
        group=GROUP,
    )
    zoneout: float = option(
        0.0,
        "zoneout: the probability that a unit keeps its previous state at a step, drawn per step, sequence and unit",
        group=GROUP,
    )
    recurrent_dropout: float = option(
        0.0,
        "dropout of the previous output where it enters the gates: one mask per sequence, the same at every "
        "step (not for mingru and minlstm, whose gates read the input only)",
        group=GROUP,
    )

    # the section of `rnnkit train TASK --help` that lists them; a task may say more (sort: the encoder only)
    flag_groups: ClassVar[dict[str, str]] = {
        GROUP: "in training only, on the recurrent layer (all 0, off, by default; rnnkit.Regularised)"
    }

    def regularisers(self) -> dict[str, float]:
        """The five values by their `rnnkit.Regularised` keyword names."""
        return {f.name: getattr(self, f.name) for f in fields(RegulariserOptions)}

    def check_regularisers(self, cell: type[GatedCell]) -> None:
        """A one-line UsageError naming the flag for a value outside [0, 1), or for a regulariser the
        cell class has nothing to apply to."""
        for name, p in self.regularisers().items():
            if not 0.0 <= p < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {p}")
        what = f"the {cell.__name__} cell"
        if self.weight_drop and issubclass(cell, ParallelScanCell):
            raise UsageError(
                f"--weight-drop: {what} has no recurrent weights (its gates read the input only); "
                "use --zoneout, --input-dropout or --output-dropout"
            )
        if self.recurrent_dropout and cell.step is not GatedCell.step:
            if issubclass(cell, ParallelScanCell):
                raise UsageError(
                    f"--recurrent-dropout: {what} reads no previous output in its gates; "
                    "use --zoneout, --input-dropout or --output-dropout"
                )
            raise UsageError(
                f"--recurrent-dropout: {what} rewrites step, so its recurrent input cannot be dropped apart "
                "from the rest of its step"
            )


def regularised(layer: nn.Module, options: Any) -> nn.Module:
    """`layer` itself when every regulariser of `options` (a config inheriting RegulariserOptions) is 0,
    else `rnnkit.Regularised(layer, ...)` with them."""
    if not any(RegulariserOptions.regularisers(options).values()):
        return layer
    o = options
    return Regularised(
        layer,
        input_dropout=o.input_dropout,
        output_dropout=o.output_dropout,
        weight_drop=o.weight_drop,
        zoneout=o.zoneout,
        recurrent_dropout=o.recurrent_dropout,
    )


def unwrapped(module: nn.Module) -> Any:
    """The recurrent layer inside `module` (a `Regularised`), or `module` itself."""
    return module.layer if isinstance(module, Regularised) else module


def without_regularisers(model: nn.Module) -> nn.Module:
    """`model` with every `Regularised` inside it replaced by its layer, in place: the network evaluation
    runs (the regularisers act in training only), as `rnnkit export` writes it. The parameters are the
    same objects; only the wrapper's name ("rnn.layer.") leaves the state_dict's keys."""
    for name, child in list(model.named_children()):
        if isinstance(child, Regularised):
            setattr(model, name, child.layer)
        else:
            without_regularisers(child)
    return model
