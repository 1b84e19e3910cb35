"""rnnkit.fit: a user's model and data through the engine, exact resume, stateful TBPTT, errors."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rnnkit
from rnnkit.engine.errors import CheckpointError, UsageError

QUIET = dict(threads=1, device="cpu", plot=False, progress="lines")


class Net(nn.Module):
    """A GRU over the sequence, dropout (so the RNG stream matters for exact resume), one output."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.rnn = rnnkit.GRU(3, hidden, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)  # (B, T, H)
        return self.head(self.drop(out[:, -1])).squeeze(-1)  # (B,)


class Streamer(nn.Module):
    """Stateful: takes (x, state) and returns (output per step, state)."""

    def __init__(self):
        super().__init__()
        self.rnn = rnnkit.LSTM(1, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.seen: list = []

    def forward(self, x, state):
        self.seen.append(state)
        out, state = self.rnn(x, state)  # (B, T, 8)
        return self.head(out).squeeze(-1), state


def data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, 3, generator=g)  # (N, T, 3)
    return x, x.sum((1, 2)) + 0.1 * torch.randn(n, generator=g)


def train_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]


def sigterm_at(call: int):
    """An mse loss that sends this process SIGTERM during its `call`-th call (1-based)."""
    calls = [0]

    def loss(output, target):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return nn.functional.mse_loss(output, target)
    return loss


def series():
    t = torch.arange(4 * 8 * 5, dtype=torch.float32)
    x = torch.sin(t / 5).unsqueeze(-1)  # (N, 1)
    return rnnkit.stream_batches(x, torch.sin((t + 1) / 5), batch_size=4, length=5)  # 8 batches of (4, 5, 1)


@pytest.mark.parametrize("kind", ["tensors", "dataloader", "stateful"])
def test_an_interrupted_and_resumed_run_logs_the_same_losses_step_for_step(tmp_path, kind):
    def run(out: Path, loss):
        torch.manual_seed(3)
        common = dict(steps=14, lr=1e-2, out=out, log_every=1, eval_every=5, **QUIET)
        if kind == "tensors":
            x, y = data()
            return rnnkit.fit(Net(), (x, y), val=data(32), loss=loss, batch_size=16, **common)
        if kind == "dataloader":
            loader = DataLoader(TensorDataset(*data()), batch_size=16, shuffle=True)
            return rnnkit.fit(Net(), loader, loss=loss, **common)
        return rnnkit.fit(Streamer(), series(), val=series()[:2], loss=loss, stateful=True, **common)

    _, whole = run(tmp_path / "whole", "mse")
    _, cut = run(tmp_path / "cut", sigterm_at(6))
    assert (whole["stopped_by"], cut["stopped_by"], cut["step"]) == ("steps", "SIGTERM", 6)
    torch.manual_seed(99)  # the resumed run must not depend on the global RNG it starts with
    x, y = data()
    if kind == "tensors":
        _, resumed = rnnkit.fit(Net(), (x, y), val=data(32), batch_size=16, steps=14, lr=1e-2,
                                out=tmp_path / "cut", resume=True, **QUIET)
    elif kind == "dataloader":
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        _, resumed = rnnkit.fit(Net(), loader, steps=14, lr=1e-2, out=tmp_path / "cut", resume=True, **QUIET)
    else:
        _, resumed = rnnkit.fit(Streamer(), series(), val=series()[:2], stateful=True, steps=14, lr=1e-2,
                                out=tmp_path / "cut", resume=True, **QUIET)
    assert resumed["step"] == 14
    whole_losses = train_losses(tmp_path / "whole")
    assert [s for s, _ in whole_losses] == list(range(1, 15))
    assert train_losses(tmp_path / "cut") == whole_losses  # identical floats, step for step
    assert resumed["best"] == whole["best"]


def test_fit_returns_the_trained_model_and_load_brings_it_back(tmp_path):
    x, y = data()
    model, summary = rnnkit.fit(Net(), (x, y), val=data(32), metrics=["mae"], epochs=3, batch_size=16, lr=1e-2,
                                out=tmp_path / "run", **QUIET)
    assert summary["step"] == 18 and summary["stopped_by"] == "steps"  # 3 epochs of 6 batches
    assert set(summary["val"]) == {"loss", "mae"} and summary["best"]["metric"] == "loss"
    first = train_losses(tmp_path / "run")[0][1]
    assert summary["val"]["loss"] < first  # it learned something
    for name in ("config.json", "metrics.jsonl", "checkpoints/best.safetensors", "checkpoints/last.safetensors"):
        assert (tmp_path / "run" / name).is_file()
    loaded = rnnkit.load(tmp_path / "run", checkpoint="last")  # Net() needs no arguments
    model.eval()
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_resuming_a_finished_run_returns_its_last_evaluation(tmp_path):
    x, y = data()
    args = dict(val=data(32), metrics=["mae"], epochs=1, batch_size=16, out=tmp_path / "run", **QUIET)
    _, first = rnnkit.fit(Net(), (x, y), **args)
    _, again = rnnkit.fit(Net(), (x, y), resume=True, **args)  # nothing left to train
    assert again["step"] == first["step"] == 6
    assert again["val"] == first["val"] and set(again["val"]) == {"loss", "mae"}


def test_stateful_carries_the_detached_state_and_resets_it_each_epoch(tmp_path):
    model = Streamer()
    batches = series()
    rnnkit.fit(model, batches, loss="mse", stateful=True, epochs=2, out=tmp_path / "run", **QUIET)
    seen = model.seen[:16]  # 2 epochs of 8 batches (evaluations come after)
    assert seen[0] is None and seen[8] is None  # a fresh state at each epoch
    assert all(isinstance(s, rnnkit.LSTMState) and not s.h.requires_grad for s in seen[1:8] + seen[9:16])
    # the state handed to batch k+1 is the one batch k ended with: run batch 0 by hand to compare
    with torch.no_grad():
        _, end = rnnkit.LSTM(1, 8, batch_first=True).forward(batches[0][0])  # shapes only
    assert seen[1].h.shape == end.h.shape


def test_user_errors_are_one_line_and_name_what_is_wrong(tmp_path):
    x, y = data()
    with pytest.raises(UsageError, match=r"cannot take the first training batch \(inputs \(\(32, 6, 3\) float32\)"):
        rnnkit.fit(nn.Sequential(nn.Linear(5, 1)), (x, y), out=tmp_path / "a", **QUIET)
    with pytest.raises(UsageError, match=r"loss must be a scalar tensor .* got \(32,\)"):
        rnnkit.fit(Net(), (x, y), loss=lambda o, t: (o - t) ** 2, out=tmp_path / "b", **QUIET)
    with pytest.raises(UsageError, match=r"train data is empty \(0 batches\)"):
        rnnkit.fit(Net(), [], steps=3, out=tmp_path / "c", **QUIET)
    with pytest.raises(UsageError, match=r"train data is empty \(0 samples\)"):
        rnnkit.fit(Net(), (x[:0], y[:0]), steps=3, out=tmp_path / "c", **QUIET)
    with pytest.raises(UsageError, match=r"validation data is empty"):
        rnnkit.fit(Net(), (x, y), val=iter([]), steps=3, out=tmp_path / "e", **QUIET)
    with pytest.raises(UsageError, match="unknown option\\(s\\) learning_rate"):
        rnnkit.fit(Net(), (x, y), learning_rate=1.0)
    with pytest.raises(UsageError, match=r"output has shape \(32, 1\) but the target has shape \(32,\)"):
        rnnkit.fit(nn.Sequential(nn.Flatten(), nn.Linear(18, 1)), (x, y), out=tmp_path / "d", **QUIET)


def test_a_run_directory_of_another_model_is_refused(tmp_path):
    x, y = data()
    rnnkit.fit(Net(), (x, y), steps=2, out=tmp_path / "run", **QUIET)
    other = nn.Sequential(nn.Flatten(), nn.Linear(18, 1))
    with pytest.raises(UsageError, match=r"is a run of test_fit:Net, not of torch\.nn\.modules\.container:Sequential"):
        rnnkit.fit(other, (x, y), steps=4, out=tmp_path / "run", resume=True, **QUIET)
    with pytest.raises(UsageError, match=r"holds a test_fit:Net model, not a torch"):
        rnnkit.load(tmp_path / "run", model=other)
    with pytest.raises(CheckpointError, match="does not match this run's model"):
        rnnkit.load(tmp_path / "run", model=Net(hidden=5))
    with pytest.raises(UsageError, match="already holds a run; continue it with resume=True"):
        rnnkit.fit(Net(), (x, y), steps=2, out=tmp_path / "run", **QUIET)


def test_eval_of_a_fit_run_says_how_to_load_it(tmp_path, capsys):
    from rnnkit.cli.main import main

    x, y = data()
    rnnkit.fit(Net(), (x, y), steps=2, out=tmp_path / "run", **QUIET)
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "was trained from Python with rnnkit.fit on a test_fit:Net model; load it with rnnkit.load(" in err


def test_the_progress_bar_ends_where_the_time_budget_will(tmp_path):
    from rnnkit.engine.trainer import TrainConfig, Trainer

    class Bar:
        total = 1000

        def refresh(self):
            pass
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.bar = TrainConfig(steps=1000, time_budget=10.0), Bar()
    trainer._bar_total(step=20, steps_per_s=5.0, spent=4.0)  # 6 s left at 5 steps/s: 30 more steps
    assert trainer.bar.total == 50
    trainer._bar_total(step=20, steps_per_s=500.0, spent=4.0)  # the budget outlasts the steps
    assert trainer.bar.total == 1000


CHILD = """
import sys, torch
torch.set_num_threads(1)
import rnnkit
from torch import nn
torch.manual_seed(0)
x = torch.randn(8, 5, 3); y = x.sum((1, 2))
torch.manual_seed(1)
class Last(nn.Module):
    def forward(self, out):
        return out[0][:, -1]
model = nn.Sequential(rnnkit.GRU(3, 8, batch_first=True), Last(), nn.Linear(8, 1), nn.Flatten(0))
rnnkit.fit(model, (x, y), batch_size=8, steps=1, shuffle=False, optimizer="sgd", momentum=0.0, weight_decay=0.0,
           lr=1.0, grad_clip=0.0, warmup_steps=0, schedule="constant", out=sys.argv[1], threads=1, device="cpu",
           plot=False, progress="lines")
"""


def test_fit_under_two_processes_takes_the_same_first_step_as_one(tmp_path):
    """Plain SGD with lr 1: the step is the gradient. Two gloo processes with 4 rows each of a batch of 8
    must write the same weights as one process with all 8 (DistributedDataParallel averages)."""
    import socket
    import subprocess
    import sys

    from rnnkit.engine.checkpoint import load_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    ranks = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "two")], stderr=subprocess.PIPE, text=True,
                              env=env | rank) for rank in ranks]
    try:
        one = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "one")], env=env, capture_output=True,
                             text=True, timeout=120)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one.returncode == 0 and [p.returncode for p in procs] == [0, 0], (one.stderr, errs)
    w1, _ = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.safetensors", prefix="model.")
    w2, state = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.safetensors", prefix="model.")
    assert state["world_size"] == 2 and state["step"] == 1 and w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
