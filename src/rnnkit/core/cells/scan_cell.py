"""Base class of the cells whose recurrence is a linear scan: gates from the input alone.

A :class:`ParallelScanCell` updates its state as

    h_t = a_t * h_{t-1} + b_t,        a_t = a(x_t) in (0, 1),   b_t = b(x_t) > 0,

with no recurrent weights: nothing of ``h_{t-1}`` enters a gate, so a layer can compute every
step's ``a`` and ``b`` from one input projection and run the whole sequence as one scan
(``rnnkit.core.parallel_scan``), and a step with a carried state is O(1). A subclass names its
gates (rows of ``weight_ih``, as every :class:`GatedCell`) and gives ``log a`` and ``log b`` from
the gates' input parts (``log_coefficients``); the scan works in log space, where the products of
many ``a``'s neither underflow nor lose precision.

Parameters: ``weight_ih`` (G*H, I) and ``bias_ih`` (G*H,) only (no ``weight_hh``/``bias_hh``).
State: ``HiddenState(h)``, (B, H).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnkit.core.gates import GatedCell, HiddenState


def log_g(x: Tensor) -> Tensor:
    """``log g(x)`` for Feng et al.'s positive activation ``g(x) = x + 1/2`` (x >= 0), ``sigmoid(x)`` (x < 0).

    ``g`` is continuous (both pieces are 1/2 at 0), grows like the identity for large ``x`` and is
    positive, so the candidate state ``g(x)`` has a log and the scan's ``b`` stays positive."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


class ParallelScanCell(GatedCell):
    """A cell with ``h_t = a(x_t) * h_{t-1} + b(x_t)``: subclasses implement ``log_coefficients``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        # no recurrent weights: a gate that saw h_{t-1} would make the scan sequential
        del self.weight_hh
        del self.bias_hh

    def log_coefficients(self, x) -> tuple[Tensor, Tensor]:
        """Gates' input parts (``x.<gate>``, each (..., H)) -> ``(log a, log b)``, each (..., H)."""
        raise NotImplementedError

    def combine(self, x, h, state: HiddenState) -> tuple[Tensor, HiddenState]:
        """One step; ``h`` (the recurrent parts) is unused, there are none."""
        log_a, log_b = self.log_coefficients(x)
        h_new = torch.addcmul(torch.exp(log_b), torch.exp(log_a), state.h)
        return h_new, HiddenState(h_new)

    def step(self, xz: Tensor, state: HiddenState) -> tuple[Tensor, HiddenState]:
        return self.combine(self.split(xz), None, state)

    def project_hidden(self, h: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no recurrent weights: its gates read the input only")
