"""A run given only a time budget fits its schedule to it: the learning rate decays over the budget's
wall time, evaluations are spread over it, and the run stops, evaluates and saves when it runs out.
Driven by a fake clock, so nothing sleeps and every number is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.engine import trainer as trainer_module
from rnnkit.engine.errors import UsageError
from rnnkit.engine.schedule import lr_at
from rnnkit.engine.trainer import EVALS_PER_BUDGET, TrainConfig, budget_defaults


def test_the_learning_rate_follows_the_elapsed_share_of_the_budget():
    c = TrainConfig(steps=None, time_budget=100.0, warmup_steps=5, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, c, 50.0) == pytest.approx(0.2)  # warmup is counted in steps
    assert [lr_at(9, c, t) for t in (0.0, 50.0, 100.0, 250.0)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    linear = TrainConfig(steps=None, time_budget=100.0, warmup_steps=0, lr=1.0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(3, linear, t) for t in (0.0, 25.0, 100.0)] == pytest.approx([1.0, 0.75, 0.0])
    stepped = TrainConfig(steps=110, time_budget=1.0, warmup_steps=10, lr=1.0)  # --steps set: by steps
    assert lr_at(60, stepped, 99.0) == pytest.approx(0.55)
    # a task's step cap under the budget: whichever is further along sets the schedule
    assert [lr_at(55, c, t, cap=105) for t in (0.0, 50.0, 75.0)] == pytest.approx([0.55, 0.55, 0.2318], abs=1e-4)
    assert lr_at(60, stepped, 0.0, cap=20) == pytest.approx(0.55)  # --steps given: the cap is not read


def test_a_budget_without_steps_lifts_the_step_limit_and_spreads_the_evaluations():
    merged = {"steps": 2100, "lr": 6e-3, "time_budget": 600.0}
    assert budget_defaults(merged, {"time_budget": 600.0}) == merged | {"steps": None, "eval_every": None}
    given = {"time_budget": 600.0, "eval_every": 100}
    assert budget_defaults(merged | given, given)["eval_every"] == 100
    assert budget_defaults(merged, {"time_budget": 600.0, "steps": 2100}) == merged  # --steps keeps its meaning
    with pytest.raises(UsageError, match="needs a --time-budget"):
        TrainConfig(steps=None)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_timed_run_uses_its_whole_budget_and_decays_to_the_end(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(trainer_module, "_clock", clock)

    def loss(out, target):  # each training step takes one second of the fake clock
        if torch.is_grad_enabled():
            clock.t += 1.0
        return nn.functional.mse_loss(out, target)

    torch.manual_seed(0)
    x = torch.randn(32, 3)
    opts = dict(lr=0.1, warmup_steps=0, log_every=1, threads=1, device="cpu", plot=False, progress="lines")
    _, summary = rnnkit.fit(
        nn.Linear(3, 1),
        (x, x.sum(1, keepdim=True)),
        val=(x, x.sum(1, keepdim=True)),
        loss=loss,
        batch_size=8,
        time_budget=10.0,
        out=tmp_path / "run",
        **opts,
    )
    assert (summary["step"], summary["stopped_by"]) == (10, "time_budget")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]  # the lr of step k is set at k seconds into the budget
    assert lrs == pytest.approx([0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10))) for k in range(10)])
    assert [r["step"] for r in rows if "val_loss" in r] == list(range(1, 11))  # every tenth of the budget
    assert EVALS_PER_BUDGET == 10
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (config["steps"], config["eval_every"], config["time_budget"]) == (None, None, 10.0)
    # the budget is the run's total: resuming with nothing left only evaluates, and a larger one goes on
    _, again = rnnkit.fit(
        nn.Linear(3, 1),
        (x, x.sum(1, keepdim=True)),
        val=(x, x.sum(1, keepdim=True)),
        loss=loss,
        batch_size=8,
        time_budget=10.0,
        out=tmp_path / "run",
        resume=True,
        **opts,
    )
    assert again["step"] == 10
    _, longer = rnnkit.fit(
        nn.Linear(3, 1),
        (x, x.sum(1, keepdim=True)),
        val=(x, x.sum(1, keepdim=True)),
        loss=loss,
        batch_size=8,
        time_budget=13.0,
        out=tmp_path / "run",
        resume=True,
        **opts,
    )
    assert (longer["step"], longer["stopped_by"]) == (13, "time_budget")


def test_slow_evaluations_are_spaced_out_to_keep_their_share_of_the_budget(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(trainer_module, "_clock", clock)

    def loss(out, target):  # a training step takes 1 s, an evaluation (one batch) 1 s too
        clock.t += 1.0
        return nn.functional.mse_loss(out, target)

    x = torch.randn(8, 3)
    opts = dict(warmup_steps=0, log_every=100, threads=1, device="cpu", plot=False, progress="lines")
    rnnkit.fit(
        nn.Linear(3, 1),
        (x, x.sum(1, keepdim=True)),
        val=(x, x.sum(1, keepdim=True)),
        loss=loss,
        batch_size=8,
        time_budget=40.0,
        out=tmp_path / "run",
        **opts,
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # due every 4 s, but after a 1 s evaluation the next waits 19 s: at 4, then 4 + 1 + 19 = 24... the end
    assert [r["time"] for r in rows if "val_loss" in r] == [4.0, 23.0, 40.0]


def test_a_tie_with_the_best_evaluation_moves_the_best_checkpoint_to_the_later_one(tmp_path):
    def flat(out, target):  # the same validation loss at every evaluation
        return (out * 0.0).sum() + 1.0

    x = torch.randn(8, 3)
    _, summary = rnnkit.fit(
        nn.Linear(3, 1),
        (x, x),
        val=(x, x),
        loss=flat,
        batch_size=8,
        steps=4,
        eval_every=2,
        out=tmp_path / "run",
        threads=1,
        device="cpu",
        plot=False,
        progress="lines",
    )
    assert summary["best"] == {"metric": "loss", "value": 1.0, "step": 4}


def test_a_task_step_cap_ends_a_timed_run_early_with_its_schedule_and_evaluations(tmp_path, monkeypatch):
    """Task.budget_steps (classify's --max-epochs): under a budget the run ends at whichever comes
    first, and the learning rate decays and the evaluations are spaced over that."""
    from rnnkit.engine.fit import ModelTask

    clock = Clock()
    monkeypatch.setattr(trainer_module, "_clock", clock)
    monkeypatch.setattr(ModelTask, "budget_steps", lambda self: 5)

    def loss(out, target):  # each training step takes one second of the fake clock
        if torch.is_grad_enabled():
            clock.t += 1.0
        return nn.functional.mse_loss(out, target)

    x = torch.randn(32, 3)
    data = (x, x.sum(1, keepdim=True))
    opts = dict(loss=loss, batch_size=8, threads=1, device="cpu", plot=False, progress="lines")
    _, summary = rnnkit.fit(
        nn.Linear(3, 1),
        data,
        val=data,
        time_budget=20.0,
        out=tmp_path / "run",
        lr=0.1,
        warmup_steps=0,
        log_every=1,
        **opts,
    )
    assert (summary["step"], summary["stopped_by"]) == (5, "steps")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]  # over the 5 steps, not the 20 s the budget would allow
    assert lrs == pytest.approx([0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 5))) for k in range(5)])
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2, 3, 4, 5]
    # a budget shorter than the cap: the budget ends the run, as without one
    clock.t = 1000.0
    monkeypatch.setattr(ModelTask, "budget_steps", lambda self: 50)
    _, short = rnnkit.fit(nn.Linear(3, 1), data, time_budget=4.0, out=tmp_path / "short", **opts)
    assert (short["step"], short["stopped_by"]) == (4, "time_budget")
