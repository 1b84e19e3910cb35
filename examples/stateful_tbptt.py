"""Stateful truncated backpropagation through time: one long signal, the state carried across batches.

    python examples/stateful_tbptt.py [--quick]

`stream_batches` cuts the signal into 16 parallel streams and chunks of 50 steps, so row b of each batch
continues row b of the batch before; with stateful=True, rnnkit.fit hands the model the (detached) state
the previous batch ended with, and gradients flow through 50 steps at a time.
"""
import argparse
import tempfile

import torch
from torch import nn

import rnnkit


class NextValue(nn.Module):
    def __init__(self, hidden: int = 48):
        super().__init__()
        self.rnn = rnnkit.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, state):                     # x: (B, T, 1); state: None or (1, B, hidden)
        out, state = self.rnn(x, state)              # (B, T, hidden)
        return self.head(out).squeeze(-1), state     # (B, T), the state for the next batch


parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="a few seconds on a short signal")
args = parser.parse_args()

t = torch.arange(16 * 50 * (4 if args.quick else 40), dtype=torch.float32)
signal = torch.sin(t / 9) * torch.sin(t / 97)                # slow beats: memory beyond 50 steps helps
train = rnnkit.stream_batches(signal[:-1, None], signal[1:], batch_size=16, length=50)
model, summary = rnnkit.fit(NextValue(), train[:-1], val=train[-1:], stateful=True,
                            epochs=2 if args.quick else 30, lr=1e-2, out=tempfile.mkdtemp() + "/tbptt", threads=1)
print(f"{summary['step']} steps; validation mse {summary['val']['loss']:.5f}")
