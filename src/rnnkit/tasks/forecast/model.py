"""The forecasting network: a recurrent encoder over a window of recent values, relative to the last one.

Inputs are a window of L recent values taken relative to the window's last value and divided by the
series' mean absolute step (`scale`), so the network sees shapes, not levels: a CO2 window far above
anything in training reads like the ones below it. With a season of length m > 1 each step also gets
its position in the season as (sin, cos) of 2 pi t / m.

    z_t   = (x_t - x_L) / scale,  t = 1..L                                   (B, L)
    h     = RNN([z_t, sin, cos])  last hidden state                          (B, hidden)
    y     = x_L + scale * (W_ar z + b_ar + W_out h)   for each horizon step  (B, H)

`W_ar z + b_ar` is a linear autoregression on the window (the direct strategy, one row per horizon
step), started from the least-squares (ridge) solution on the training windows; the recurrent part
learns what the linear one misses, as in LSTNet's highway. With quantiles q_1..q_k the network also
outputs k more values per step, trained with the pinball loss, for an interval around the forecast.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rnnkit.core import GRU, LSTM
from rnnkit.tasks.regularisers import RegulariserOptions, regularised

RNNS = {"gru": GRU, "lstm": LSTM}


class ForecastNet(nn.Module):
    def __init__(
        self,
        window: int,
        horizon: int,
        period: int,
        hidden: int = 32,
        cell: str = "gru",
        quantiles: tuple[float, ...] = (),
        dropout: float = 0.0,
        regularisers: RegulariserOptions | None = None,
    ):
        super().__init__()
        self.window, self.horizon, self.period, self.quantiles = window, horizon, period, tuple(quantiles)
        outputs = 1 + len(self.quantiles)
        layer = RNNS[cell](1 + (2 if period > 1 else 0), hidden, batch_first=True)
        self.rnn = regularised(layer, regularisers or RegulariserOptions())  # the layer itself when all are 0
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, horizon * outputs)
        self.ar = nn.Linear(window, horizon)  # the linear autoregression (median output only)
        # the recurrent part starts silent: training begins at the autoregression's least-squares
        # solution and moves away only where the data pull it
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """z: (B, L) relative window; phase: (B, L) position of each step in the season.
        Returns (B, H, 1 + len(quantiles)): the median forecast, then each quantile (relative, scaled)."""
        B = z.shape[0]
        feats = [z.unsqueeze(-1)]
        if self.period > 1:
            angle = (2 * math.pi / self.period) * phase
            feats += [torch.sin(angle).unsqueeze(-1), torch.cos(angle).unsqueeze(-1)]
        out, _ = self.rnn(torch.cat(feats, -1))  # (B, L, hidden)
        y = self.head(self.drop(out[:, -1])).view(B, self.horizon, -1)  # (B, H, Q)
        return y + self.ar(z).unsqueeze(-1)  # quantiles are offsets around the same autoregression

    @torch.no_grad()
    def init_autoregression(self, z: torch.Tensor, target: torch.Tensor, alpha: float = 1.0) -> None:
        """Set the linear part to the ridge solution of target (K, H) on z (K, L)."""
        A = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1).double()  # (K, L + 1)
        reg = alpha * torch.eye(A.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0.0  # no shrinkage on the intercept
        W = torch.linalg.solve(A.T @ A + reg, A.T @ target.double())  # (L + 1, H)
        self.ar.weight.copy_(W[:-1].T)
        self.ar.bias.copy_(W[-1])


def pinball(pred: torch.Tensor, target: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Mean absolute error of the median (B, H, 0) plus the pinball loss of each quantile output."""
    loss = (pred[..., 0] - target).abs().mean()
    for k, q in enumerate(quantiles, start=1):
        diff = target - pred[..., k]
        loss = loss + torch.maximum(q * diff, (q - 1) * diff).mean()
    return loss
