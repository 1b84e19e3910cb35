"""The trainer: one loop for every task.

`train(...)` turns a task name and configs into a run directory and a trained model; `Trainer.fit`
is the loop. Per step: learning rate from the schedule, the task's batch for this step and process,
forward under autocast, one all-reduce that shares the loss and every reason to stop (non-finite
loss, a signal, the time budget) so all processes agree, backward, clip, optimizer step. Every
`--eval-every` steps and at the end: evaluate on process 0, log, refresh curves.png, write the last
(and possibly best) checkpoint.

Exit codes returned: 0 done (steps or time budget reached), 1 non-finite loss, 128 + signal number
after SIGINT / SIGTERM (130 / 143) with a checkpoint saved.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from rnnkit.engine import checkpoint as ckpt
from rnnkit.engine.config import from_dict, from_saved, to_dict
from rnnkit.engine.distributed import (
    World,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    setup_world,
    teardown_world,
)
from rnnkit.engine.errors import CheckpointError, UsageError
from rnnkit.engine.rundir import (
    CHECKPOINTS,
    CURVES,
    METRICS,
    MetricsLog,
    class_path,
    default_run_dir,
    plot_curves,
    read_run,
    rnnkit_version,
    write_config,
)
from rnnkit.engine.schedule import OPTIMIZERS, SCHEDULES, lr_at
from rnnkit.tasks.base import Task, load_task_class, move_to, option

EVALS_PER_BUDGET = 10  # evaluations of a run scheduled by its time budget (the last one at its end)
EVAL_SHARE = 0.05  # evaluations by time take at most this share of the budget (the last one aside)
_clock = time.monotonic  # the trainer's clock; tests put a fake one here


def budget_defaults(merged: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`merged` (defaults and flags) with the schedule fitted to a time budget: when a --time-budget is
    given and `given` (the explicit flags) has no --steps, the run has no step limit and its schedule
    spans the budget (and, without --eval-every, so do its evaluations)."""
    if merged.get("time_budget") is None or "steps" in given:
        return merged
    return merged | {"steps": None} | ({} if "eval_every" in given else {"eval_every": None})


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = option(
        1000,
        "optimizer steps in total; the schedule ends here. Given a --time-budget and no --steps, there is "
        "no step limit: the schedule spans the budget's wall time",
        resumable=True,
    )
    time_budget: float | None = option(
        None,
        "stop after this many seconds of wall time, then evaluate and save (default: no limit); per "
        "invocation when --steps is set, else the run's total, over which the learning rate decays",
        resumable=True,
    )
    clock: Literal["wall", "cpu"] = option(
        "wall",
        "what the time budget and the logged times count: wall time, or this process's CPU time, which "
        "compares configurations fairly on a machine others load too (at 1 thread)",
    )
    optimizer: Literal["adamw", "sgd"] = option("adamw", "optimizer")
    lr: float = option(3e-3, "peak learning rate")
    weight_decay: float = option(0.01, "weight decay (decoupled for AdamW)")
    momentum: float = option(0.9, "momentum (SGD only)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    warmup_steps: int = option(100, "steps of linear learning-rate warmup")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate shape after warmup")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr (cosine and linear)")
    eval_every: int | None = option(
        500,
        "evaluate and checkpoint every N steps (and at the end); none: evenly over the time budget, "
        f"{EVALS_PER_BUDGET} times unless the task says otherwise (the default under a budget without steps)",
        resumable=True,
    )
    log_every: int = option(50, "log the mean train loss every N steps", resumable=True)
    seed: int = option(1337, "seed for model initialisation, data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "where to train; auto picks cuda when available", resumable=True
    )
    amp: Literal["off", "bf16", "fp16"] = option("off", "mixed-precision autocast on CUDA", resumable=True)
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)", resumable=True)
    plot: bool = option(True, "redraw RUN_DIR/curves.png at each evaluation", resumable=True)
    progress: Literal["auto", "bar", "lines"] = option(
        "auto", "progress display on stderr: a tqdm bar, plain log lines, or auto (bar on a terminal)", resumable=True
    )

    def __post_init__(self):
        checks = [
            (self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (
                self.steps is not None or self.time_budget is not None,
                "--steps none needs a --time-budget: without either, training would never end",
            ),
            (
                self.eval_every is not None or self.time_budget is not None,
                "--eval-every none (evaluations spread over the time budget) needs a --time-budget",
            ),
            (
                self.time_budget is None or self.time_budget > 0,
                f"--time-budget must be positive seconds, got {self.time_budget}",
            ),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (
                self.eval_every is None or self.eval_every >= 1,
                f"--eval-every must be at least 1, got {self.eval_every}",
            ),
            (self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {sorted(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {sorted(SCHEDULES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass(frozen=True)
class RunConfig:
    out: str | None = option(None, "run directory to create (default: runs/<task>-<timestamp>)", metavar="DIR")
    resume: str | None = option(
        None,
        "continue the run in this directory from its last checkpoint; its "
        "saved config is used, and flags may change only the steps, time "
        "budget, evaluation/logging cadence and devices",
        metavar="RUN_DIR",
    )


# ---- entry point used by the CLI ------------------------------------------------------------------
def train(task_name: str, task_flags: dict[str, Any], train_flags: dict[str, Any], run: RunConfig) -> int:
    """Start or resume a run. `task_flags` / `train_flags` hold only the flags given explicitly."""
    task_cls = load_task_class(task_name)
    return run_task(task_cls, task_flags, train_flags, run, name=task_cls.name if ":" in task_name else task_name)[0]


def run_task(
    task_cls: type[Task],
    task_flags: dict[str, Any],
    train_flags: dict[str, Any],
    run: RunConfig,
    name: str | None = None,
) -> tuple[int, Trainer]:
    """`train` for a Task class: (exit code, trainer); `rnnkit.train` calls it from Python. `name`
    is what the run is called (default: the class's registry name)."""
    task_name = name or task_cls.name
    if run.resume:
        if run.out:
            raise UsageError("--out and --resume exclude each other: a resumed run stays in its directory")
        info = read_run(run.resume)
        if info.task != task_name:
            raise UsageError(
                f"{info.path} is a {info.task!r} run; resume it with `rnnkit train {info.task} --resume {info.path}`"
            )
        task_config = from_saved(task_cls.Config, info.task_config, source=f"{info.path}/config.json")
        for name, value in task_flags.items():
            if getattr(task_config, name) != value:
                raise UsageError(
                    f"--{name.replace('_', '-')} cannot change on --resume (the run has {getattr(task_config, name)!r})"
                )
        saved = from_dict(TrainConfig, info.train_config, source=f"{info.path}/config.json")
        fixed = {f.name for f in TrainConfig.__dataclass_fields__.values() if not f.metadata["resumable"]}
        for name, value in train_flags.items():
            if name in fixed and getattr(saved, name) != value:
                raise UsageError(
                    f"--{name.replace('_', '-')} cannot change on --resume (the run has {getattr(saved, name)!r})"
                )
        train_config = from_dict(TrainConfig, {**to_dict(saved), **train_flags})
        if not info.last.is_file():
            raise UsageError(f"{info.path} has no checkpoint to resume from ({info.last} is missing)")
        run_dir = info.path
    else:
        task_config = from_dict(task_cls.Config, task_flags, source="flags")
        merged = budget_defaults({**task_cls.train_defaults, **train_flags}, train_flags)
        train_config = from_dict(TrainConfig, merged, source="flags")
        run_dir = Path(run.out) if run.out else default_run_dir(task_name)
        if (run_dir / "config.json").exists():
            raise UsageError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
            )

    return launch(
        lambda: task_cls.from_run_dir(task_config, run_dir) if run.resume else task_cls.create(task_config, run_dir),
        train_config,
        run_dir,
        resume=bool(run.resume),
        identity=task_name,
        resume_command=f"rnnkit train {task_name} --resume {{run_dir}}",
        write_config=lambda d: write_config(
            d, task_name, to_dict(task_config), to_dict(train_config), rnnkit_version(), task_class=class_path(task_cls)
        ),
    )


def launch(
    make_task, config: TrainConfig, run_dir: Path, *, resume: bool, identity: str, resume_command: str, write_config
) -> tuple[int, Trainer]:
    """The one path into the loop, for `rnnkit train` and `rnnkit.fit` alike: join the process group,
    make the task (`make_task()`, on every process), on a new run write the run directory
    (`write_config(run_dir)` and the task's artifacts, process 0 only), then train. Returns the exit
    code and the trainer (its `summary()` says how the run ended)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    world = setup_world(config.device)
    try:
        run_dir = Path(broadcast_object(str(run_dir), world))  # one timestamped name for all processes
        task = make_task()
        if not resume:
            if world.is_main:
                (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
                task.save_artifacts(run_dir)
                write_config(run_dir)
            barrier(world)
        trainer = Trainer(
            task, config, run_dir, world, identity=identity, resume_command=resume_command.format(run_dir=run_dir)
        )
        return trainer.fit(resume=resume), trainer
    finally:
        teardown_world(world)


# ---- the loop -------------------------------------------------------------------------------------
class _StopSignals:
    """First SIGINT/SIGTERM: remember it, finish the step, save. Second: abort at once."""

    def __init__(self, say):
        self.signum = 0
        self.say = say
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.say(
            f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
            f"(send it again to abort without saving)"
        )

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            # ValueError: not the main thread (e.g. embedded use); signals stay as they were
            with contextlib.suppress(ValueError):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def _interactive() -> bool:
    """A terminal on stderr, or a Jupyter kernel (whose stderr is no terminal but shows widgets)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    py = random.getstate()
    npy = np.random.get_state(legacy=True)
    assert isinstance(npy, tuple)  # the legacy form: ("MT19937", keys, pos, has_gauss, cached_gaussian)
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = meta["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


class Trainer:
    """Trains `task` under `config` in `run_dir`. Only process 0 writes files or prints.

    `identity` names what the run trains (a task's name, a user model's class); a checkpoint written
    under another identity is refused on resume. `resume_command` is what the user is told to run
    after a signal. The trainer knows nothing else about the task."""

    def __init__(
        self, task: Task, config: TrainConfig, run_dir: Path, world: World, *, identity: str, resume_command: str
    ):
        self.task, self.identity, self.config, self.run_dir, self.world = task, identity, config, run_dir, world
        self.resume_command = resume_command
        self.step, self.stopped_by = 0, ""
        self.report: str | None = None
        self.last_eval: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best evaluation
        self.metrics = MetricsLog(run_dir / METRICS)
        self.last_path = run_dir / CHECKPOINTS / "last.safetensors"
        self.best_path = run_dir / CHECKPOINTS / "best.safetensors"
        self.bar = None
        # the task's most useful steps under a time budget (Task.budget_steps), when the schedule runs by time
        self.cap = task.budget_steps() if config.steps is None and config.time_budget is not None else None
        device = world.device
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
        if self.amp_dtype is not None and device.type != "cuda":
            self.say(f"note: --amp {config.amp} applies to CUDA only; training in float32 on {device}")
            self.amp_dtype = None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    # -- output ---------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.world.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save(self, step: int, elapsed: float, is_best: bool, evaluated: bool = True) -> None:
        """Gather every process's RNG / task state, then process 0 writes last (and best).
        `evaluated`: whether this step was evaluated (False after a signal), so a resume knows."""
        rng_tensors, rng_meta = _rng_state(self.world.device)
        mine = (
            {f"rng.{k}": v.cpu() for k, v in rng_tensors.items()}
            | {f"task.{k}": v.detach().cpu() for k, v in self.task.tensor_state().items()},
            {"rng": rng_meta, "data_state": self.task.data_state()},
        )
        per_rank = gather_objects(mine, self.world)
        if not self.world.is_main:
            return
        tensors = {f"model.{k}": v for k, v in self.raw_model.state_dict().items()}
        optim_tensors, optim_meta = ckpt.optimizer_to_flat(self.optimizer)
        tensors |= optim_tensors
        for r, (rank_tensors, _) in enumerate(per_rank):
            tensors |= {f"rank{r}.{k}": v for k, v in rank_tensors.items()}
        state = {
            "task": self.identity,
            "step": step,
            "elapsed": elapsed,
            "world_size": self.world.size,
            "optimizer": optim_meta,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "best": self.best,
            "log_window": self.window,
            "ranks": [meta for _, meta in per_rank],
            "evaluated": evaluated,
        }
        ckpt.save_checkpoint(self.last_path, tensors, state)
        if is_best:
            ckpt.save_checkpoint(self.best_path, tensors, state)

    def _load(self) -> tuple[int, float]:
        tensors, state = ckpt.load_checkpoint(self.last_path)
        path = self.last_path
        try:
            if state["task"] != self.identity:
                raise CheckpointError(f"checkpoint {path} belongs to a {state['task']!r} run, not {self.identity!r}")
            if state["world_size"] != self.world.size:
                raise UsageError(
                    f"checkpoint {path} was written by {state['world_size']} process(es); resume "
                    f"with the same number (now {self.world.size}) so the data order stays exact"
                )
            ckpt.load_model_weights(path, self.raw_model)
            ckpt.optimizer_from_flat(self.optimizer, ckpt.strip_prefix(tensors, "optim."), state["optimizer"], path)
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            r = self.world.rank
            mine = ckpt.strip_prefix(tensors, f"rank{r}.")
            _set_rng_state(ckpt.strip_prefix(mine, "rng."), state["ranks"][r]["rng"], self.world.device)
            self.task.load_tensor_state(ckpt.strip_prefix(mine, "task."))
            self.task.load_data_state(state["ranks"][r]["data_state"])
            self.best = state["best"]
            self.window = state["log_window"]
            self.resumed_evaluated = bool(state.get("evaluated", True))
            return int(state["step"]), float(state["elapsed"])
        except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} is incomplete or foreign ({type(e).__name__}: {e})") from None

    # -- evaluation -----------------------------------------------------------------------------------
    def _evaluate(self, step: int, elapsed: float) -> bool:
        """Evaluate on process 0, log and plot; True when this is the best evaluation so far."""
        if not self.world.is_main:
            return False
        model = self.raw_model
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(model)
                text = self.task.on_eval(model, step)
        finally:
            model.train()
        if not metrics:  # nothing to evaluate on (rnnkit.fit without validation data): checkpoints only
            return False
        if "loss" not in metrics:
            raise RuntimeError(f"{type(self.task).__name__}.evaluate must return a 'loss' entry")
        row = {"step": step, "time": round(elapsed, 3)} | {f"val_{k}": float(v) for k, v in metrics.items()}
        self.metrics.append(row)
        self.last_eval = {k: float(v) for k, v in metrics.items()}
        self.say(
            "eval "
            + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "time")
        )
        if text:
            self.say(text)
        if self.config.plot:
            plot_curves(self.metrics, self.run_dir / CURVES)
        key = self.task.best_metric
        value = float(metrics[key])
        # a tie goes to the later, longer-trained evaluation (sort's accuracy stays at 1.0 while it
        # keeps improving on lengths it was not validated on)
        better = self.best is None or (
            value >= self.best["value"] if self.task.higher_is_better else value <= self.best["value"]
        )
        if better and math.isfinite(value):
            self.best = {"metric": key, "value": value, "step": step}
            return True
        return False

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, resume: bool) -> int:
        cfg, world, task = self.config, self.world, self.task
        _seed_everything(cfg.seed)
        self.raw_model = task.build_model().to(world.device)
        self.optimizer = OPTIMIZERS[cfg.optimizer](self.raw_model.parameters(), cfg)
        self.best = None
        self.window = [0.0, 0.0, 0]  # loss * items, items, steps since the last log line (global)
        step, elapsed0 = 0, 0.0
        if world.is_main:  # temporary files of a writer that was killed mid-checkpoint
            for stale in (self.run_dir / CHECKPOINTS).glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
        if resume:
            step, elapsed0 = self._load()
            if world.is_main:
                self.metrics.truncate_after(step)
                # the evaluation a finished run ends with, so its summary holds it when nothing is left to do
                evaluated = [r for r in self.metrics.rows() if "val_loss" in r]
                if evaluated:
                    self.last_eval = {k[4:]: v for k, v in evaluated[-1].items() if k.startswith("val_")}
            self.say(f"resuming {self.run_dir} at step {step}")
        elif world.rank > 0:  # distinct dropout streams per process; process 0 matches a 1-process run
            torch.manual_seed(cfg.seed + 1_000_003 * world.rank)
        model: nn.Module = self.raw_model
        if world.distributed:
            model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[world.device] if world.device.type == "cuda" else None
            )
        model.train()

        use_bar = world.is_main and (cfg.progress == "bar" or (cfg.progress == "auto" and _interactive()))
        if use_bar:
            from tqdm.auto import tqdm  # a widget in Jupyter, text on a terminal

            self.bar = tqdm(
                total=cfg.steps, initial=step, file=sys.stderr, dynamic_ncols=True, unit="step", desc=self.identity
            )
        clock = time.process_time if cfg.clock == "cpu" else _clock
        start, start_step = clock(), step
        self.start, self.clock = start, clock
        self.elapsed = lambda: elapsed0 + clock() - start  # wall time over all invocations of the run
        elapsed = self.elapsed
        window_start, window_items = clock(), 0.0
        exit_code, stopped_by = 0, None
        last_eval_step = step if resume and self.resumed_evaluated else -1
        timed = cfg.steps is None  # the schedule spans the time budget, the run's total wall time
        budget = math.inf if cfg.time_budget is None else cfg.time_budget
        cap = self.cap  # the task's most useful steps under a budget, when fewer than the budget allows
        limit = math.inf if cfg.steps is None else cfg.steps
        if cap is not None:
            limit = cap
        if timed and elapsed0 >= budget:
            limit = step  # resumed after its budget ran out: nothing left but the final evaluation
        # evaluation by time: every `eval_every_s` seconds of the run, at the agreed clock `now`, and
        # under a step cap also every `eval_every_cap` steps, so the evaluations span whichever ends first
        evals = getattr(task, "evals_per_budget", EVALS_PER_BUDGET)
        eval_every_s = None if cfg.eval_every is not None else budget / evals
        eval_every_cap = max(1, cap // evals) if cap is not None and eval_every_s else None
        now = elapsed0  # the run's elapsed time, as all processes agree on it (their mean)
        next_eval = (math.floor(now / eval_every_s) + 1) * eval_every_s if eval_every_s else math.inf
        try:
            with _StopSignals(self.say) as signals:
                while step < limit:
                    lr = lr_at(step, cfg, now, cap)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    batch = move_to(task.train_batch(step, world.rank, world.size), world.device)
                    with self._autocast():
                        loss, n_items = task.loss(model, batch)
                    value = float(loss.detach())
                    spent = elapsed()
                    over_time = (spent if timed else clock() - start) >= budget
                    loss_sum, items, bad, sig, late, spent_sum = all_reduce_sum(
                        [
                            value * n_items if math.isfinite(value) else 0.0,
                            float(n_items),
                            0.0 if math.isfinite(value) else 1.0,
                            float(signals.signum),
                            float(over_time),
                            spent,
                        ],
                        world,
                    )
                    now = spent_sum / world.size
                    if bad:
                        self.stopped_by = "non-finite loss"
                        return self._nonfinite(step, value)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                    grad_norm = None
                    if cfg.grad_clip > 0:
                        if self.scaler:
                            self.scaler.unscale_(self.optimizer)
                        grad_norm = float(nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip))
                    if self.scaler:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step += 1
                    self.window = [self.window[0] + loss_sum, self.window[1] + items, self.window[2] + 1]
                    window_items += items
                    if self.bar is not None:
                        self._bar_total(step, (step - start_step) / max(clock() - start, 1e-9), clock() - start)
                        self.bar.update(1)
                        self.bar.set_postfix_str(f"loss {loss_sum / max(items, 1):.4f}")
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        t = clock()
                        rate = window_items / max(t - window_start, 1e-9)
                        self._log_train(step, lr, rate, grad_norm, (step - start_step) / max(t - start, 1e-9))
                        window_start, window_items = t, 0.0
                    if sig:  # some process got SIGINT/SIGTERM: all stop after this same step
                        stopped_by = signal.Signals(signals.signum or signal.SIGTERM)
                        break
                    if late:
                        self.say(f"time budget of {cfg.time_budget:g}s reached at step {step}")
                        self.stopped_by = "time_budget"
                        break
                    due = now >= next_eval if cfg.eval_every is None else step % cfg.eval_every == 0
                    if eval_every_cap is not None and step % eval_every_cap == 0:
                        due = True
                    if due or step == cfg.steps:
                        began = elapsed()
                        self._save(step, elapsed(), self._evaluate(step, elapsed()))
                        last_eval_step = step
                        if eval_every_s:  # never more than EVAL_SHARE of the time: a slow one spaces the next
                            (took,) = all_reduce_sum([elapsed() - began], world)
                            next_eval = max(
                                (math.floor(now / eval_every_s) + 1) * eval_every_s,
                                now + took / world.size * (1 / EVAL_SHARE - 1),
                            )
                        window_start = clock()  # throughput counts training time only
                if stopped_by is not None:
                    self._save(step, elapsed(), False, evaluated=False)
                    exit_code = 128 + int(stopped_by)
                    self.stopped_by = stopped_by.name
                    self.say(
                        f"stopped by {stopped_by.name} at step {step}; "
                        f"checkpoint saved to {self.last_path}\nresume with: {self.resume_command}"
                    )
                elif last_eval_step != step:  # time budget, or resumed at the end: evaluate and save
                    self._save(step, elapsed(), self._evaluate(step, elapsed()))
        finally:
            self.step = step
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        if exit_code == 0:
            self.stopped_by = self.stopped_by or "steps"
            self._report()
            best = ""
            if self.best:
                best = f"; best {self.best['metric']} {self.best['value']:.4g} at step {self.best['step']}"
            self.say(f"done at step {step}{best}; run directory {self.run_dir}")
        return exit_code

    def _log_train(self, step: int, lr: float, rate: float, grad_norm: float | None, steps_per_s: float) -> None:
        """Append the window's mean train loss to metrics.jsonl and show it; resets the window."""
        loss_sum, items, n = self.window
        self.window = [0.0, 0.0, 0]
        if not self.world.is_main or n == 0:
            return
        train_loss = loss_sum / max(items, 1.0)
        row = {
            "step": step,
            "time": round(self.elapsed(), 3),
            "train_loss": train_loss,
            "lr": lr,
            f"{self.task.items_name}_per_s": round(rate, 1),
        }
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        self.metrics.append(row)
        if self.bar is None:
            cfg = self.config
            total = cfg.steps if cfg.steps is not None else self.cap
            eta = math.inf if total is None else (total - step) / steps_per_s if steps_per_s > 0 else math.inf
            if cfg.time_budget is not None:
                spent = self.elapsed() if cfg.steps is None else self.clock() - self.start
                eta = min(eta, max(0.0, cfg.time_budget - spent))
            self.say(
                f"step {step}{'' if cfg.steps is None else f'/{cfg.steps}'} | loss {train_loss:.4f} | lr {lr:.2e} | "
                f"{_fmt_rate(rate)} {self.task.items_name}/s | "
                f"{_fmt_time(eta) if math.isfinite(eta) else '?'} left"
            )
        else:
            self.bar.set_postfix_str(f"loss {train_loss:.4f} | {_fmt_rate(rate)} {self.task.items_name}/s")

    def _bar_total(self, step: int, steps_per_s: float, spent: float) -> None:
        """Under a time budget the bar's end is the step the budget will reach at the current rate
        (never beyond --steps), so its total and ETA follow whichever limit comes first."""
        budget = self.config.time_budget
        if budget is None or self.bar is None or steps_per_s <= 0:
            return
        if self.config.steps is None:
            spent = self.elapsed()  # the budget is the run's total
        projected = step + max(1, round(steps_per_s * max(0.0, budget - spent)))
        total = self.config.steps if self.config.steps is not None else self.cap
        if total is not None:
            projected = min(total, projected)
        if projected != self.bar.total:
            self.bar.total = projected
            self.bar.refresh()

    def _report(self) -> None:
        """The task's closing text (Task.on_end), on process 0."""
        if not self.world.is_main:
            return
        model = self.raw_model
        model.eval()
        try:
            with torch.no_grad():
                self.report = self.task.on_end(model)
        finally:
            model.train()
        if self.report:
            self.say(self.report)

    def summary(self) -> dict[str, Any]:
        """How the run ended: run_dir, step, stopped_by ("steps", "time_budget", "SIGINT", "SIGTERM",
        "non-finite loss"), the best evaluation, the last evaluation's metrics and the wall time."""
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "stopped_by": self.stopped_by,
            "best": self.best,
            "val": self.last_eval,
            "elapsed": round(self.elapsed(), 3),
            "report": self.report,
        }

    def _nonfinite(self, step: int, value: float) -> int:
        where = (
            f"The last good checkpoint is {self.last_path} (step {self._ckpt_step()})"
            if self.last_path.exists()
            else "No checkpoint was written before it"
        )
        self.say(
            f"error: training loss is {value if not math.isfinite(value) else 'non-finite on another process'}"
            f" at step {step + 1}; stopped without saving. {where}. Try a lower --lr or --grad-clip."
        )
        return 1

    def _ckpt_step(self) -> Any:
        try:
            return ckpt.load_checkpoint(self.last_path, prefix="\0")[1]["step"]
        except CheckpointError:
            return "?"
