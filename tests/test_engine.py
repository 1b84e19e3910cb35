"""Engine specifications: exact resume, safe checkpoints, signals, NaN, distributed gradients.

All runs use the toy task of test_engine_toy.py (a torch.nn.GRU on random data, with dropout and a
hidden state carried between steps), so these tests do not depend on rnnkit.core or the real tasks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test_engine_toy  # noqa: F401  (registers the "toy" task)
from rnnkit.cli.main import main
from rnnkit.engine.checkpoint import load_checkpoint, save_checkpoint
from rnnkit.engine.errors import CheckpointError, UsageError
from rnnkit.engine.rundir import load_run
from rnnkit.engine.schedule import lr_at
from rnnkit.engine.trainer import TrainConfig

TESTS = Path(__file__).resolve().parent
TOY = str(TESTS / "test_engine_toy.py")
FAST = ["--threads", "1", "--device", "cpu", "--no-plot", "--log-every", "1", "--warmup-steps", "2"]


def train(tmp: Path, *flags: str) -> int:
    return main(["train", "toy", "--out", str(tmp), *FAST, *flags])


def rows(run: Path, key: str) -> list[tuple[int, float]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            out.append((r["step"], r[key]))
    return out


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]))
    return env


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train(run, "--steps", "6", "--eval-every", "3") == 0
    return run


# ---- exact resume -----------------------------------------------------------------------------------
def test_resume_after_sigterm_logs_the_same_losses_as_an_uninterrupted_run(tmp_path, capsys):
    flags = ["--steps", "12", "--eval-every", "4", "--seed", "7"]
    assert train(tmp_path / "whole", *flags) == 0
    # The task sends SIGTERM to this process during step index 5: the trainer finishes that step,
    # saves, says how to resume, and returns 128 + 15.
    assert train(tmp_path / "cut", *flags, "--signal-at", "5") == 143
    err = capsys.readouterr().err
    assert f"rnnkit train toy --resume {tmp_path / 'cut'}" in err
    _, state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    assert state["step"] == 6
    assert main(["train", "toy", "--resume", str(tmp_path / "cut"), "--threads", "1"]) == 0
    whole, cut = rows(tmp_path / "whole", "train_loss"), rows(tmp_path / "cut", "train_loss")
    assert [s for s, _ in whole] == list(range(1, 13))
    assert cut == whole  # identical floats, step for step
    assert rows(tmp_path / "cut", "val_loss") == rows(tmp_path / "whole", "val_loss")


def test_resuming_a_signal_stopped_run_at_its_end_evaluates_and_saves(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--steps", "12", "--eval-every", "4", "--signal-at", "5") == 143
    assert [s for s, _ in rows(run, "val_loss")] == [4]
    assert main(["train", "toy", "--resume", str(run), "--steps", "6", "--threads", "1"]) == 0
    assert [s for s, _ in rows(run, "val_loss")] == [4, 6]  # step 6 was never evaluated before
    _, state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert state["step"] == 6 and state["evaluated"]


def test_resume_refuses_changed_model_flags_and_foreign_tasks(trained_run, capsys):
    assert main(["train", "toy", "--resume", str(trained_run), "--hidden", "3"]) == 2
    assert main(["train", "toy", "--resume", str(trained_run), "--lr", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rnnkit: error: --hidden cannot change on --resume (the run has 16)",
                   "rnnkit: error: --lr cannot change on --resume (the run has 0.003)"]


# ---- checkpoints --------------------------------------------------------------------------------------
def test_checkpoint_roundtrip_keeps_tensors_and_json_state(tmp_path):
    tensors = {"model.w": torch.randn(3, 4), "rank0.rng.torch_cpu": torch.get_rng_state()}
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"step": 3, "nested": {"a": [1, 2.5, None]}})
    loaded, state = load_checkpoint(tmp_path / "c.safetensors")
    assert state == {"step": 3, "nested": {"a": [1, 2.5, None]}}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "empty"])
def test_corrupt_checkpoint_is_refused_with_one_line_naming_the_file(trained_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.safetensors"
    data = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage":
        last.write_bytes(b"\x00\x01not a checkpoint" * 100)
    elif damage == "empty":
        last.write_bytes(b"")
    else:  # a valid safetensors file that rnnkit did not write
        from safetensors.torch import save_file
        save_file({"weight": torch.zeros(2)}, str(last))
    with pytest.raises(CheckpointError, match=str(last)):
        load_checkpoint(last)
    assert main(["eval", str(run), "--checkpoint", "last"]) == 2
    assert main(["train", "toy", "--resume", str(run), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("rnnkit: error: checkpoint ") and str(last) in line for line in err)


def test_checkpoint_of_another_model_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["task_config"]["hidden"] = 5
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match this run's model"):
        load_run(run)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A child rewrites a ~24 MB checkpoint in a loop; we SIGKILL it while a temporary file exists
    (i.e. mid-write), then the last complete checkpoint must load."""
    path = tmp_path / "last.safetensors"
    child = """
import sys, torch
torch.set_num_threads(1)
from rnnkit.engine.checkpoint import save_checkpoint
big = torch.randn(6_000_000)
for step in range(10**6):
    big[0] = step
    save_checkpoint(sys.argv[1], {"model.big": big}, {"step": step})
"""
    proc = subprocess.Popen([sys.executable, "-c", child, str(path)], env=subprocess_env())
    try:
        kills = 0
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            tmp_files = [p for p in tmp_path.iterdir() if p.name.startswith(".last.safetensors.tmp")]
            if tmp_files and path.exists():
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert kills == 1, "the child never wrote a checkpoint"
    assert proc.returncode == -signal.SIGKILL
    tensors, state = load_checkpoint(path)
    assert int(tensors["model.big"][0]) == state["step"] >= 0  # complete and self-consistent


# ---- stopping ------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "20", "--eval-every", "5", "--nan-at", "7") == 1
    err = capsys.readouterr().err
    assert "training loss is nan at step 8" in err
    assert f"last good checkpoint is {run / 'checkpoints' / 'last.safetensors'} (step 5)" in err
    _, state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert state["step"] == 5
    assert max(s for s, _ in rows(run, "train_loss")) == 7  # nothing logged for the bad step


def test_time_budget_stops_then_evaluates_and_saves(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--steps", "100000", "--eval-every", "100000", "--time-budget", "0.5", "--sleep", "0.05") == 0
    _, state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert 1 <= state["step"] < 100
    assert rows(run, "val_loss")[-1][0] == state["step"]
    assert (run / "checkpoints" / "best.safetensors").exists()


def test_sigint_from_outside_saves_prints_resume_and_exits_nonzero(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, TOY, "train", "toy", "--out", str(run), *FAST, "--steps", "100000", "--sleep", "0.02"],
        env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # plain log lines (stderr is a pipe); interrupt once training runs
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGINT)
                break
        err = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"resume with: rnnkit train toy --resume {run}" in err
    assert "Traceback" not in err
    _, state = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert state["step"] >= 3


# ---- schedule and config -----------------------------------------------------------------------------
def test_learning_rate_warms_up_then_follows_cosine_to_the_floor():
    c = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_at(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(50, TrainConfig(steps=110, warmup_steps=10, schedule="constant")) == TrainConfig().lr


def test_bad_train_config_values_are_user_errors():
    with pytest.raises(UsageError, match="--grad-clip must be >= 0"):
        TrainConfig(grad_clip=-1.0)


# ---- distributed ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_half_batches_take_the_same_first_step_as_one_process(tmp_path):
    """Plain SGD with lr 1 makes the step equal the gradient: w1 = w0 - g. Two gloo processes with
    batch 4 each must produce the same weights (hence gradients) as one process with batch 8."""
    flags = ["--steps", "1", "--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0", "--lr", "1",
             "--grad-clip", "0", "--warmup-steps", "0", "--schedule", "constant", "--dropout", "0",
             "--batch-size", "8", "--threads", "1", "--device", "cpu", "--no-plot"]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = subprocess_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}
        procs.append(subprocess.Popen([sys.executable, TOY, "train", "toy", "--out", str(tmp_path / "ddp"), *flags],
                                      env=env, stderr=subprocess.PIPE, text=True))
    try:
        assert main(["train", "toy", "--out", str(tmp_path / "one"), *flags]) == 0
        outs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[1] == ""  # only process 0 prints
    one, _ = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.safetensors", prefix="model.")
    two, state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors", prefix="model.")
    assert state["world_size"] == 2 and one.keys() == two.keys()
    torch.manual_seed(TrainConfig().seed)
    w0 = test_engine_toy.ToyModel(16, 0.0).state_dict()
    for k in one:
        assert not torch.equal(one[k], w0[f"{k[len('model.'):]}"])  # a real step happened
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


# ---- a user's task ---------------------------------------------------------------------------------------
def test_a_registered_user_task_trains_and_evaluates_in_a_fresh_process_without_editing_rnnkit(trained_run):
    """config.json records the task's import path, so `rnnkit eval RUN` in a process that never imported
    the task finds it; `rnnkit train module:Class` trains one by its path."""
    assert json.loads((trained_run / "config.json").read_text())["task_class"] == "test_engine_toy:ToyTask"
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-m", "rnnkit", "eval", str(trained_run), "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"loss", "mae"}
    done = subprocess.run([sys.executable, "-m", "rnnkit", "train", "test_engine_toy:ToyTask", "--out",
                           str(trained_run.parent / "by-path"), *FAST, "--steps", "2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((trained_run.parent / "by-path" / "config.json").read_text())["task"] == "toy"
