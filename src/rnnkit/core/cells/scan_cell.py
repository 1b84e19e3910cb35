"""Base class of the cells whose recurrence is a linear scan: gates from the input alone.

A :class:`ParallelScanCell` mixes its state with a candidate, both computed from the input only::

    z_t = sigmoid(k_t)                   how much of the candidate enters
    h_t = (1 - z_t) * h_{t-1} + z_t * g(v_t)

with ``k_t`` and ``v_t`` functions of ``x_t`` (a subclass says which: ``mix_inputs``) and Feng et
al.'s positive activation ``g(v) = v + 1/2`` (v >= 0), ``sigmoid(v)`` (v < 0). This is the
recurrence ``h_t = a_t h_{t-1} + b_t`` with ``a_t = 1 - z_t`` in (0, 1) and ``b_t = z_t g(v_t) > 0``.
No recurrent weights: nothing of ``h_{t-1}`` enters a gate, so a layer can compute every step's
``k`` and ``v`` from one input projection and run the whole sequence as one scan
(``rnnkit.core.parallel_scan``), and a step with a carried state is O(1). In log space, where the
parallel scan works, ``log a = -softplus(k)`` and ``log b = -softplus(-k) + log g(v)``.

Parameters: ``weight_ih`` (G*H, I) and ``bias_ih`` (G*H,) only (no ``weight_hh``/``bias_hh``).
State: ``HiddenState(h)``, (B, H).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core.gates import GatedCell, HiddenState


def candidate(v: Tensor) -> Tensor:
    """Feng et al.'s ``g(v) = v + 1/2`` (v >= 0), ``sigmoid(v)`` (v < 0): continuous (both 1/2 at 0),
    like the identity for large ``v``, and positive, so the scan's ``b`` has a log."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def log_candidate(v: Tensor) -> Tensor:
    """``log g(v)``, computed without forming ``g`` (``log sigmoid(v) = -softplus(-v)``)."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


class ParallelScanCell(GatedCell):
    """A cell with ``h_t = (1 - z_t) h_{t-1} + z_t g(v_t)``, ``z_t = sigmoid(k_t)``: subclasses implement
    ``mix_inputs``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        # no recurrent weights: a gate that saw h_{t-1} would make the scan sequential
        del self.weight_hh
        del self.bias_hh

    def mix_inputs(self, x) -> tuple[Tensor, Tensor]:
        """Gates' input parts (``x.<gate>``, each (..., H)) -> ``(k, v)``: the logit of the candidate's
        share ``z`` and the candidate's pre-activation, each (..., H)."""
        raise NotImplementedError

    def combine(self, x, h, state: HiddenState) -> tuple[Tensor, HiddenState]:
        """One step; ``h`` (the recurrent parts) is unused: there are none."""
        k, v = self.mix_inputs(x)
        h_new = torch.lerp(state.h, candidate(v), torch.sigmoid(k))
        return h_new, HiddenState(h_new)

    def step(self, xz: Tensor, state: HiddenState) -> tuple[Tensor, HiddenState]:
        return self.combine(self.split(xz), None, state)

    def project_hidden(self, h: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no recurrent weights: its gates read the input only")
