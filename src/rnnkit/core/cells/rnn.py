"""Basic (Elman) RNN cell: a single gate whose output is the state::

    h' = act(x W_ih + b_ih + h W_hh + b_hh),    act = tanh (default) or relu

State: ``HiddenState(h)``, (B, H). Called as torch.nn.RNNCell is, ``h = cell(x, h)``
(``cell.advance(x, state)`` gives rnnkit's ``(h, state)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnkit.core.gates import GatedCell, HiddenState, gate

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class RNNCell(GatedCell):
    """One Elman RNN step with ``nonlinearity`` "tanh" or "relu"."""

    gate_names = ("h",)

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", device=None, dtype=None
    ):
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"nonlinearity must be one of {sorted(ACTIVATIONS)}, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:  # type: ignore[override]  # torch.nn.RNNCell's call, not GatedCell.forward's (h, state)
        """torch.nn.RNNCell's call: ``input`` (B, I) or (I,) -> ``h`` (B, H) or (H,)."""
        return self._torch_call(input, hx, nn.RNNCell.forward)

    def combine(self, x, h, state: HiddenState) -> tuple[Tensor, HiddenState]:
        h_new = gate(ACTIVATIONS[self.nonlinearity], x.h, h.h)
        return h_new, HiddenState(h_new)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"
