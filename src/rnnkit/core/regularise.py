"""Regularisers of a recurrent layer: around its recurrence, and inside it on the layer's own kernels.

``Regularised(layer, ...)`` wraps any ``Recurrent`` (every cell, built-in or a user's) with two of
AWD-LSTM's regularisers (Merity, Keskar & Socher 2017), in training mode only:

- variational dropout (Gal & Ghahramani 2016) on the layer's input and output: one mask per
  sequence, the same at every step, ``x * m / (1 - p)`` with ``m`` (B, 1, F) Bernoulli(1 - p);
- weight-drop (DropConnect, Wan et al. 2013) on every cell's recurrent weights ``weight_hh``: one
  mask per call, shared by the batch and every step, ``W_hh * M / (1 - p)``.

The dropped weights are swapped in for the call (``torch.func.functional_call``), so the layer runs
the route it would run anyway, the C++ loops included, and the gradient reaches ``weight_hh``
through the mask. Cells without recurrent weights (minGRU, minLSTM) have nothing to weight-drop.
Masks come from ``generator`` (a seeded ``torch.Generator`` makes a run reproducible) or torch's
global generator; ``sample_masks`` draws them, and ``forward(..., masks=...)`` takes given ones.

and two that change each step of the recurrence, applied inside the loops over time by the kernels
(core/kernels/state_noise.py; the C++ loops of the built-in cells, the sLSTM and the layer-normalised
LSTM and GRU, the generic kernel of a user's cell, the scan of minGRU and minLSTM (zoneout, in its
coefficients), the reference loop, and under ``torch.compile`` the traced loop of every cell), per
(layer, direction):

- zoneout (Krueger et al. 2016): at every step each unit keeps its whole previous state (every state
  field; its output is the kept ``h``) with probability ``zoneout``, a mask drawn per step, sequence
  and unit;
- recurrent dropout (Gal & Ghahramani 2016): the recurrent product reads ``h_{t-1} * m / (1 - p)``, one
  mask ``m`` (B, H) per sequence, the same at every step. Cells whose gates read no previous output
  (minGRU, minLSTM) have nothing to drop.

In evaluation none of them runs: the layer is itself (Krueger et al. use zoneout's expectation at
test time instead; here, as for every dropout, the plain layer).

>>> import torch, rnnkit
>>> layer = rnnkit.Regularised(rnnkit.LSTM(8, 16, batch_first=True), input_dropout=0.1, output_dropout=0.2,
...                            weight_drop=0.5, generator=torch.Generator().manual_seed(0))
>>> out, (h, c) = layer(torch.randn(4, 10, 8), lengths=[10, 3, 7, 1])
>>> tuple(out.shape)
(4, 10, 16)
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rnnkit.core.kernels.state_noise import StateNoise, drops_recurrent_input


class Masks(NamedTuple):
    """One call's masks, already scaled by ``1 / (1 - p)``; ``None`` where that regulariser is off."""

    input: Tensor | None  # (B, 1, I), batch-first
    output: Tensor | None  # (B, 1, D*H), batch-first
    weights: dict[str, Tensor]  # parameter name ("cells.0.weight_hh") -> (G*H, H)
    state: dict[int, StateNoise] | None = None  # cell index (layer * D + direction) -> its zoneout and
    # recurrent dropout masks: recurrent (B, H) scaled, zoneout (B, T, H) bool (True: keep the state)


def _mask(shape, p: float, like: Tensor, generator) -> Tensor:
    keep = torch.full(shape, 1.0 - p, dtype=like.dtype, device=like.device)
    return torch.bernoulli(keep, generator=generator).div_(1.0 - p)


def bernoulli_bools(shape, p: float, device, generator) -> Tensor:
    """A bool tensor of ``shape``, each element True with probability ``p`` (0 < p < 1), independently.

    Drawn as the positions of the rarer value (True where ``p <= 0.5``): the gaps between them are
    geometric, ``floor(log(1 - u) / log(1 - q))`` for ``u`` uniform (float64) and ``q = min(p, 1 - p)``,
    so a mask costs one uniform per rare element instead of one per element (zoneout's (B, T, H)
    mask at p = 0.1: a tenth of the draws; ``bernoulli_`` on the whole mask took about 10% of an
    LSTM layer's training step). Reproducible from ``generator`` as any draw. Under ``torch.compile``,
    whose graph cannot hold a loop that reads its draws' values, one uniform per element instead:
    ``rand < p``, the same distribution."""
    if torch.compiler.is_compiling():
        return torch.rand(shape, device=device, generator=generator) < p
    n = math.prod(shape)
    rare = p <= 0.5  # the value whose positions are drawn
    q = p if rare else 1.0 - p
    scale = 1.0 / math.log1p(-q)
    mask = torch.full(shape, not rare, dtype=torch.bool, device=device)
    flat = mask.view(-1)
    start = 0  # the first position not yet decided
    while start < n:
        expected = (n - start) * q
        m = int(expected + 6.0 * math.sqrt(expected) + 16)  # enough to pass the end almost always
        u = torch.rand(m, dtype=torch.float64, device=device, generator=generator)
        steps = u.neg_().log1p_().mul_(scale).to(torch.int64).add_(1)  # gap + 1, >= 1 (truncation: the floor)
        positions = steps.cumsum_(0).add_(start - 1)  # increasing
        inside = int(torch.searchsorted(positions, n))
        flat.index_fill_(0, positions[:inside], rare)
        start = int(positions[-1]) + 1 if inside == m else n
    return mask


class Regularised(nn.Module):
    """``layer`` with variational dropout on its input and output, weight-drop on ``weight_hh``, zoneout
    and recurrent dropout (the module docstring)."""

    def __init__(
        self,
        layer: nn.Module,
        *,
        input_dropout: float = 0.0,
        output_dropout: float = 0.0,
        weight_drop: float = 0.0,
        zoneout: float = 0.0,
        recurrent_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, p in (
            ("input_dropout", input_dropout),
            ("output_dropout", output_dropout),
            ("weight_drop", weight_drop),
            ("zoneout", zoneout),
            ("recurrent_dropout", recurrent_dropout),
        ):
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        self.layer = layer
        self.input_dropout = float(input_dropout)
        self.output_dropout = float(output_dropout)
        self.weight_drop = float(weight_drop)
        self.zoneout = float(zoneout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.generator = generator

    def sample_masks(self, x: Tensor) -> Masks:
        """The masks of one training call on ``x`` (in the layer's layout)."""
        B = x.shape[0] if self.layer.batch_first else x.shape[1]
        width = self.layer.hidden_size * self.layer.num_directions
        gen = self.generator
        inp = _mask((B, 1, x.shape[-1]), self.input_dropout, x, gen) if self.input_dropout else None
        out = _mask((B, 1, width), self.output_dropout, x, gen) if self.output_dropout else None
        weights = {}
        if self.weight_drop:
            for name, w in self.layer.named_parameters():
                if re.fullmatch(r"weight_hh(_l\d+(_reverse)?)?", name.rpartition(".")[2]):  # torch.nn's names too
                    weights[name] = _mask(w.shape, self.weight_drop, w, gen)
        state = None
        if self.zoneout or self.recurrent_dropout:
            T = x.shape[1] if self.layer.batch_first else x.shape[0]
            H = self.layer.hidden_size
            state = {}
            for i, cell in enumerate(self.layer.cells):
                r = None
                if self.recurrent_dropout and drops_recurrent_input(cell):
                    r = _mask((B, H), self.recurrent_dropout, x, gen)
                elif self.recurrent_dropout and "weight_hh" in cell._parameters:
                    raise ValueError(
                        f"recurrent_dropout: {type(cell).__name__} rewrites step, so its recurrent input "
                        "cannot be dropped apart from the rest of its step"
                    )
                keep = None
                if self.zoneout:  # True (keep the previous state) with probability zoneout
                    keep = bernoulli_bools((B, T, H), self.zoneout, x.device, gen)
                if r is not None or keep is not None:
                    state[i] = StateNoise(r, keep)
        return Masks(inp, out, weights, state)

    def forward(self, x: Tensor, state=None, lengths=None, *, masks: Masks | None = None):
        if not self.training:
            return self.layer(x, state, lengths=lengths)
        masks = masks if masks is not None else self.sample_masks(x)
        time_major = not self.layer.batch_first

        def apply(t: Tensor, m: Tensor | None) -> Tensor:
            if m is None:
                return t
            return t * (m.transpose(0, 1) if time_major else m)  # (1, B, F) for (T, B, F)

        x = apply(x, masks.input)
        params = dict(self.layer.named_parameters())
        dropped = {name: params[name] * m for name, m in masks.weights.items()}
        options = {"lengths": lengths}
        if masks.state:  # the layer applies them in whichever route runs it, traced ones included
            options["state_noise"] = masks.state
        output, state = functional_call(self.layer, dropped, (x, state), options, strict=False)
        return apply(output, masks.output), state

    def extra_repr(self) -> str:
        return (
            f"input_dropout={self.input_dropout}, output_dropout={self.output_dropout}, "
            f"weight_drop={self.weight_drop}, zoneout={self.zoneout}, recurrent_dropout={self.recurrent_dropout}"
        )
