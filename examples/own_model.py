"""Train a recurrent model of your own on your own tensors with rnnkit.fit, then load it back.

    python examples/own_model.py [--out runs/own-model] [--quick]

The task: given a sequence of 3 noisy channels, predict the running sum of the first channel at its end.
"""
import argparse
import tempfile

import torch
from torch import nn

import rnnkit


class SumReader(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.rnn = rnnkit.LSTM(3, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):                            # x: (B, T, 3)
        out, _ = self.rnn(x)                         # (B, T, hidden)
        return self.head(out[:, -1]).squeeze(-1)     # (B,)


parser = argparse.ArgumentParser()
parser.add_argument("--out", default=tempfile.mkdtemp() + "/own-model")
parser.add_argument("--quick", action="store_true", help="a few seconds on small data")
args = parser.parse_args()

n = 256 if args.quick else 4096
x = torch.randn(n, 20, 3)
y = x[:, :, 0].sum(1)
split = n * 7 // 8
model, summary = rnnkit.fit(SumReader(), (x[:split], y[:split]), val=(x[split:], y[split:]),
                            loss="mse", metrics=["mae"], epochs=2 if args.quick else 20, lr=3e-3,
                            out=args.out, threads=1)
print(f"validation {summary['val']}, best at step {summary['best']['step']}")

again = rnnkit.load(args.out, model=SumReader())    # the best checkpoint, in eval mode
with torch.no_grad():
    guess = float(again(x[split:split + 1]))
print(f"first validation sequence: predicted {guess:.2f}, truth {float(y[split]):.2f}")
