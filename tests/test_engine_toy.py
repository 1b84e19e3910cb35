"""A tiny task for the engine and CLI tests (no rnnkit.core: a torch.nn.GRU on random data).

It has everything a real task can have: a carried hidden state (like lm's truncated BPTT), dropout
(so RNG state matters for exact resume), an artifact file, and switches to make the loss NaN or a
step slow. Run as a script it is the `rnnkit` CLI with this task registered as "toy":

    python tests/test_engine_toy.py train toy --out /tmp/run --steps 5

It is registered with `register_task`, as a user's task would be: nothing in rnnkit names it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from rnnkit.engine import Task, UsageError, device_of, move_to, option, shard_range, step_generator  # noqa: E402
from rnnkit.tasks.base import register_task  # noqa: E402

IN = 4  # input features per time step


@dataclass(frozen=True)
class ToyConfig:
    batch_size: int = option(8, "sequences per step, summed over processes")
    seq_len: int = option(5, "time steps per sequence")
    hidden: int = option(16, "GRU hidden size")
    dropout: float = option(0.1, "dropout before the readout")
    nan_at: int = option(-1, "0-based step whose loss is NaN (-1: never)")
    sleep: float = option(0.0, "seconds each step sleeps (signal tests)")
    signal_at: int = option(-1, "0-based step at which the process sends itself SIGTERM (-1: never)")
    stateful: bool = option(True, "carry the hidden state from step to step, like truncated BPTT")


class ToyModel(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.rnn = nn.GRU(IN, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, h0):
        out, h = self.rnn(x, h0)  # (B, T, H), (1, B, H)
        return self.head(self.drop(out)).squeeze(-1), h  # (B, T)


@register_task
class ToyTask(Task):
    name = "toy"
    Config = ToyConfig
    items_name = "tokens"

    def __init__(self, config: ToyConfig, run_dir: Path):
        super().__init__(config, run_dir)
        self.hidden_state: torch.Tensor | None = None

    def save_artifacts(self, run_dir: Path) -> None:
        (Path(run_dir) / "toy.json").write_text(json.dumps({"in": IN}))

    @classmethod
    def from_run_dir(cls, config, run_dir):
        if not (Path(run_dir) / "toy.json").exists():
            raise UsageError(f"{run_dir} has no toy.json")
        return cls(config, run_dir)

    def build_model(self) -> nn.Module:
        return ToyModel(self.config.hidden, self.config.dropout)

    def _data(self, gen: torch.Generator, rows: int):
        x = torch.randn(rows, self.config.seq_len, IN, generator=gen)  # (B, T, IN)
        y = x.cumsum(1)[..., 0] * 0.3 + x[..., 1]  # (B, T)
        return x, y

    def train_batch(self, step, rank, world_size):
        rows = shard_range(self.config.batch_size, rank, world_size)
        x, y = self._data(step_generator(0, step), self.config.batch_size)  # global batch, then shard
        if step == self.config.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.config.nan_at:
            x = x * float("nan")
        return x[rows.start:rows.stop], y[rows.start:rows.stop]

    def loss(self, model, batch):
        x, y = batch
        if self.config.sleep:
            time.sleep(self.config.sleep)
        h0 = self.hidden_state if self.config.stateful else None
        pred, h = model(x, h0)
        loss = ((pred - y) ** 2).mean()
        if self.config.stateful:
            self.hidden_state = h.detach()
        return loss, y.numel()

    def evaluate(self, model, data=None):
        x, y = self._data(step_generator(0, 0, stream="val"), 16)
        x, y = move_to((x, y), device_of(model))
        pred, _ = model(x, None)
        return {"loss": float(((pred - y) ** 2).mean()), "mae": float((pred - y).abs().mean())}

    def tensor_state(self):
        return {} if self.hidden_state is None else {"hidden": self.hidden_state}

    def load_tensor_state(self, state):
        self.hidden_state = state.get("hidden")


if __name__ == "__main__":
    torch.set_num_threads(1)
    from rnnkit.cli.main import main
    sys.exit(main(sys.argv[1:]))
