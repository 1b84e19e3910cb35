"""`rnnkit.fit`: train any nn.Module on any data through the engine, from Python.

    model, summary = rnnkit.fit(model, (x, y), val=(xv, yv), loss="mse", epochs=5, lr=1e-3, out="runs/mine")
    model = rnnkit.load("runs/mine", model=MyModel())

A batch is `(inputs..., target)`: the model is called as `model(*inputs)` and the loss as
`loss(output, target)`; a model that returns a tuple (output, state), as recurrent layers do, has
its first element taken. With `stateful=True` the model is called as `model(*inputs, state)` and must
return `(output, state)`: the state is detached and carried to the next batch (truncated
backpropagation through time), reset at each epoch, saved in checkpoints, and carried across the
validation batches too. `stream_batches` lays a long sequence out for it.

Everything else is the engine's, as for `rnnkit train`: the optimizer and schedule, gradient clipping,
AMP, a progress bar (tqdm.auto), evaluation every `eval_every` steps with your metrics, metrics.jsonl
and curves.png, best and last checkpoints in `out`, exact resume with `resume=True`, SIGINT/SIGTERM
saving a checkpoint, a stop on a non-finite loss, data parallel under torchrun. The keyword options
are the fields of `TrainConfig` (`rnnkit train --help` lists them with their defaults).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from rnnkit.engine.checkpoint import load_model_weights
from rnnkit.engine.config import from_dict, to_dict
from rnnkit.engine.data import Batches, as_tensors, shard
from rnnkit.engine.errors import UsageError
from rnnkit.engine.losses import LOSSES, METRICS, resolve
from rnnkit.engine.rundir import class_path, default_run_dir, read_run, rnnkit_version, write_config
from rnnkit.engine.trainer import TrainConfig, launch
from rnnkit.tasks.base import Task, device_of, move_to

FIT = "fit"  # config.json's "task" for a run of rnnkit.fit


class FitResult(NamedTuple):
    model: nn.Module  # the trained model (its weights after the last step), in train mode
    summary: dict[str, Any]  # run_dir, step, stopped_by, best, val (the last evaluation), elapsed


# ---- the model, data and loss, as a task ----------------------------------------------------------
class ModelTask(Task):
    """A user's model, data, loss and metrics seen as a Task, so the trainer needs nothing else."""

    name = FIT
    items_name = "samples"

    def __init__(
        self,
        model: nn.Module,
        train: Batches,
        val: Batches | None,
        loss: Callable,
        metrics: dict[str, Callable],
        stateful: bool,
        run_dir: Path,
    ):
        super().__init__(None, run_dir)
        self.model, self.train, self.val, self.loss_fn, self.metrics = model, train, val, loss, metrics
        self.stateful = stateful
        self.state: Any = None  # the carried recurrent state (stateful), detached
        self.checked = False  # the first batch went through the model

    def build_model(self) -> nn.Module:
        return self.model

    def train_batch(self, step: int, rank: int, world_size: int) -> Any:
        batch, new_epoch = self.train.next()
        if new_epoch:
            self.state = None
        return shard(batch, rank, world_size)

    def _forward(self, model: nn.Module, batch: Any, where: str) -> tuple[Any, torch.Tensor]:
        inputs, target = _split(batch, where)
        try:
            out = model(*inputs, self.state) if self.stateful else model(*inputs)
        except (RuntimeError, TypeError, ValueError) as e:
            if self.checked:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"the model cannot take the first {where} batch (inputs {_describe(inputs)}, "
                f"target {_describe(target)}): {first}"
            ) from None
        if self.stateful:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise UsageError(
                    f"with stateful=True the model must return (output, state); "
                    f"{type(model).__name__} returned {type(out).__name__}"
                )
            out, self.state = out[0], _detach(out[1])
        elif isinstance(out, tuple):
            out = out[0]
        return out, target

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        out, target = self._forward(model, batch, "training")
        value = self.loss_fn(out, target)
        if not (isinstance(value, torch.Tensor) and value.dim() == 0):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UsageError(
                f"the loss must be a scalar tensor (the batch mean), got {shape} from "
                f"{getattr(self.loss_fn, '__name__', 'loss')}; reduce it, e.g. with .mean()"
            )
        self.checked = True
        return value, _rows(target)

    def evaluate(self, model: nn.Module, data: Any = None, options: Any = None) -> dict[str, float]:
        if data is not None:
            raise UsageError("a run of rnnkit.fit evaluates in Python: rnnkit.evaluate(model, data, loss=...)")
        if self.val is None:
            return {}
        carried, self.state = self.state, None
        try:
            return evaluate_batches(model, self.val.epoch_batches(), self._forward, self.loss_fn, self.metrics)
        finally:
            self.state = carried

    # ---- checkpointed state --------------------------------------------------------------------------
    def data_state(self) -> dict[str, Any]:
        return {"train": self.train.state(), "state": _spec(self.state)}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return _flatten(self.state)

    def load_tensor_state(self, state: dict[str, torch.Tensor]) -> None:
        self._tensors = state  # rebuilt by load_data_state, which the trainer calls next

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.train.load_state(state["train"])
        carried = _unflatten(state.get("state"), getattr(self, "_tensors", {}))
        self.state = move_to(carried, device_of(self.model))


def evaluate_batches(
    model: nn.Module, batches, forward, loss_fn: Callable, metrics: dict[str, Callable]
) -> dict[str, float]:
    """Row-weighted means of the loss and each metric over `batches`; `forward(model, batch, where)`
    gives (output, target)."""
    device = device_of(model)
    sums: dict[str, float] = {}
    rows = 0
    for batch in batches:
        out, target = forward(model, move_to(batch, device), "validation")
        n = _rows(target)
        for name, fn in {"loss": loss_fn, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(fn(out, target)) * n
        rows += n
    if rows == 0:
        raise UsageError("validation data is empty: it yielded no batch")
    return {k: v / rows for k, v in sums.items()}


# ---- the public calls -----------------------------------------------------------------------------
def fit(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    loss: str | Callable = "mse",
    metrics: Sequence[str | Callable] = (),
    batch_size: int = 32,
    epochs: int | None = None,
    steps: int | None = None,
    stateful: bool = False,
    shuffle: bool | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> FitResult:
    """Train `model` on `train` and return `(model, summary)`; the run directory is `out`.

    train, val   tensors `(x, y)` (batches of `batch_size` rows are cut, shuffled each epoch unless
                 `stateful`), a DataLoader, or any iterable of `(inputs..., target)` batches
    loss         "mse", "mae", "cross_entropy" or a function (output, target) -> scalar tensor
    metrics      more of those names (and "accuracy") or functions, reported at each evaluation
    epochs/steps how long: `steps` optimizer steps, else `epochs` passes over `train` (default 1);
                 with neither and a `time_budget`, as long as the budget, the schedule spanning it
    stateful     carry the model's state across batches (truncated BPTT); see the module docstring
    out, resume  the run directory (default runs/<model>-<time>); resume=True continues it exactly
    **options    TrainConfig fields: lr, optimizer, weight_decay, grad_clip, warmup_steps, schedule,
                 time_budget, eval_every, log_every, seed, device, amp, threads, plot, progress
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known - {"steps"})
    if unknown:
        raise UsageError(
            f"rnnkit.fit got unknown option(s) {', '.join(unknown)}; the training options are "
            f"{', '.join(sorted(known - {'steps'}))}"
        )
    seed = options.get("seed", TrainConfig.seed)
    shuffle = (not stateful) if shuffle is None else shuffle
    train_batches = Batches(train, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=stateful)
    if val is not None and as_tensors(val) is None and iter(val) is val:
        val = list(val)  # read at every evaluation, so an iterator is kept
    val_batches = Batches(val, batch_size=batch_size, shuffle=False, name="validation") if val is not None else None
    loss_name, loss_fn = resolve(loss, LOSSES, "loss")
    metric_fns = dict(resolve(m, METRICS, "metric") for m in metrics)
    timed = steps is None and epochs is None and options.get("time_budget") is not None
    if steps is None and not timed:
        if not train_batches.has_len():
            raise UsageError("the training data has no len(); say how long to train with steps=N")
        steps = (epochs or 1) * len(train_batches)
    model_path = class_path(type(model))
    task_config = {
        "model": model_path,
        "loss": loss_name,
        "metrics": list(metric_fns),
        "stateful": stateful,
        "batch_size": batch_size,
    }
    run_dir = Path(out) if out is not None else default_run_dir(type(model).__name__.lower())
    if resume:
        info = read_run(run_dir)
        if info.task != FIT or info.task_config.get("model") != model_path:
            trained = info.task_config.get("model") if info.task == FIT else f"the {info.task!r} task"
            raise UsageError(
                f"{run_dir} is a run of {trained}, not of {model_path}; resume it with the same "
                f"model, or train this one in a new directory"
            )
        if not info.last.is_file():
            raise UsageError(f"{run_dir} has no checkpoint to resume from ({info.last} is missing)")
        saved = from_dict(TrainConfig, info.train_config, source=f"{run_dir}/config.json")
        for name, value in options.items():
            if not TrainConfig.__dataclass_fields__[name].metadata["resumable"] and getattr(saved, name) != value:
                raise UsageError(f"{name} cannot change on resume (the run has {getattr(saved, name)!r})")
        config = from_dict(TrainConfig, {**to_dict(saved), **options, "steps": steps})
    else:
        if (run_dir / "config.json").exists():
            raise UsageError(f"{run_dir} already holds a run; continue it with resume=True or choose another out")
        if steps is None:  # only a time budget: the schedule and the evaluations span it
            defaults: dict[str, Any] = {"warmup_steps": 10, "eval_every": None, "log_every": 10}
        else:
            defaults = {
                "warmup_steps": min(100, steps // 20),
                "eval_every": min(500, steps),
                "log_every": max(1, min(50, steps // 10)),
            }
            if train_batches.has_len():
                defaults["eval_every"] = min(len(train_batches), steps)  # once an epoch
        config = from_dict(TrainConfig, {**defaults, **options, "steps": steps}, source="rnnkit.fit")
    task = ModelTask(model, train_batches, val_batches, loss_fn, metric_fns, stateful, run_dir)
    _, trainer = fit_task(
        lambda: task,
        config,
        run_dir,
        resume=resume,
        identity=f"model {model_path}",
        resume_command=f"rnnkit.fit(..., out={str(run_dir)!r}, resume=True)",
        task_name=FIT,
        task_config=task_config,
    )
    return FitResult(trainer.raw_model, trainer.summary())


def train(task: str | type[Task], *, out: str | Path | None = None, resume: bool = False, **options: Any) -> FitResult:
    """Train a task (a name such as "forecast", or a Task subclass) from Python, as
    `rnnkit train TASK` does: `options` are the task's config fields and TrainConfig's.

        model, summary = rnnkit.train("forecast", data="co2.csv", horizon=13, steps=300, out="runs/co2")
        print(summary["report"])                  # the task's closing text (forecast: its table)

    `data` may also be data in memory, which the task writes into the run directory in its own file
    format (Task.write_data): a language model takes bytes or a list of strings, a classifier
    (texts, labels) or (label, text) pairs, a forecaster a list of numbers. With `resume=True`, `out`
    is continued from its last checkpoint."""
    from rnnkit.engine.trainer import RunConfig, run_task
    from rnnkit.tasks.base import load_task_class

    task_cls = load_task_class(task) if isinstance(task, str) else task
    task_fields = {f.name for f in dataclasses.fields(task_cls.Config)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - task_fields - train_fields)
    if unknown:
        raise UsageError(
            f"rnnkit.train({task_cls.name!r}) got unknown option(s) {', '.join(unknown)}; the task's "
            f"are {', '.join(sorted(task_fields))}, the training options "
            f"{', '.join(sorted(train_fields))}"
        )
    if resume and out is None:
        raise UsageError("resume=True needs out=, the run directory to continue")
    out = Path(out) if out is not None else default_run_dir(task_cls.name)
    data = options.get("data")
    if data is not None and not isinstance(data, (str, Path)) and not resume:
        if (out / "config.json").exists():
            raise UsageError(f"{out} already holds a run; continue it with resume=True or choose another out")
        out.mkdir(parents=True, exist_ok=True)  # in-memory data: written into the run directory
        options["data"] = task_cls.write_data(data, out)
    elif isinstance(data, Path):
        options["data"] = str(data)
    tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    run = RunConfig(out=None if resume else str(out), resume=str(out) if resume else None)
    _, trainer = run_task(
        task_cls,
        {k: v for k, v in tupled.items() if k in task_fields},
        {k: v for k, v in tupled.items() if k in train_fields},
        run,
    )
    return FitResult(trainer.raw_model, trainer.summary())


def fit_task(
    make_task: Callable[[], Task],
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool,
    identity: str,
    resume_command: str,
    task_name: str,
    task_config: dict[str, Any],
    task_class: str | None = None,
):
    """A task's run through the engine (what `fit` and each task's Python entry point call):
    returns (exit code, trainer)."""
    return launch(
        make_task,
        config,
        run_dir,
        resume=resume,
        identity=identity,
        resume_command=resume_command,
        write_config=lambda d: write_config(
            d, task_name, task_config, to_dict(config), rnnkit_version(), task_class=task_class
        ),
    )


def load(
    run_dir: str | Path, model: nn.Module | None = None, checkpoint: str = "best", device: str = "cpu"
) -> nn.Module:
    """The trained model of a run directory, in eval mode, in one call.

    For a run of `rnnkit.fit`, pass a model built as it was for training (its weights are replaced);
    a model class whose constructor needs no arguments is built for you. For a task run
    (`rnnkit train lm ...`) the task rebuilds its model. `checkpoint` is "best" (falling back to "last"
    before any evaluation) or "last"."""
    from rnnkit.engine.distributed import resolve_device
    from rnnkit.engine.rundir import load_run

    info = read_run(run_dir)
    if info.task != FIT:
        return load_run(run_dir, checkpoint=checkpoint, device=device).model
    trained = info.task_config.get("model", "?")
    if model is None:
        model = _build(trained, info.path)
    elif class_path(type(model)) != trained:
        raise UsageError(f"{info.path} holds a {trained} model, not a {class_path(type(model))}")
    path = {"best": info.best, "last": info.last}.get(checkpoint)
    if path is None:
        raise UsageError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if checkpoint == "best" and not path.exists():
        path = info.last
    if not path.exists():
        raise UsageError(f"{info.path} has no checkpoint yet ({path.name} missing in {path.parent})")
    load_model_weights(path, model)
    return model.to(resolve_device(device)).eval()


def _build(path: str, run_dir: Path) -> nn.Module:
    module_name, _, qualname = path.partition(":")
    hint = f"pass one: rnnkit.load({str(run_dir)!r}, model={qualname.rsplit('.', 1)[-1]}(...))"
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj()
    except (ImportError, AttributeError, TypeError) as e:
        raise UsageError(f"{run_dir} holds a {path} model that cannot be built here ({e}); {hint}") from None


# ---- helpers ----------------------------------------------------------------------------------------
def _split(batch: Any, where: str) -> tuple[tuple, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), batch[-1]
    raise UsageError(f"a {where} batch must be (inputs..., target); got {_describe(batch)}")


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0] if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return _rows(x[0])
    return 1


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def _detach(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_detach(s) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state


def _spec(state: Any, prefix: str = "s") -> Any:
    """A JSON description of a state's structure; its tensors are named as `_flatten` names them."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return {"tensor": prefix}
    if isinstance(state, (tuple, list)):
        kind = class_path(type(state)) if hasattr(state, "_fields") else type(state).__name__
        return {"seq": kind, "items": [_spec(s, f"{prefix}.{i}") for i, s in enumerate(state)]}
    raise UsageError(f"a carried state must hold tensors, tuples or lists; got {type(state).__name__}")


def _flatten(state: Any, prefix: str = "s") -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    out: dict[str, torch.Tensor] = {}
    for i, s in enumerate(state):
        out |= _flatten(s, f"{prefix}.{i}")
    return out


def _unflatten(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if spec is None:
        return None
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    items = [_unflatten(s, tensors) for s in spec["items"]]
    kind = spec["seq"]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    module_name, _, qualname = kind.partition(":")  # a NamedTuple such as rnnkit's LSTMState
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(*items)
