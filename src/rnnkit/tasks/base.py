"""The Task interface: what a task (classify, lm, sort) gives the trainer.

It lives on the tasks floor, below the engine, so tasks never import the engine: a task needs only
this module (`Task`, `option` for its config fields, `UsageError`, the helpers at the bottom).

The trainer (engine/trainer.py) owns everything that is the same for every task: the optimizer,
learning-rate schedule, clipping, devices and mixed precision, DistributedDataParallel, progress,
metrics, plots, checkpoints and resume. A task owns its data, model, loss and metrics.

To write a task, subclass `Task` and decorate it with `register_task` (or, in an installed package,
declare it as an entry point in the "rnnkit.tasks" group); nothing in rnnkit needs editing:

    @dataclass(frozen=True)
    class SortConfig:                        # model + data flags; becomes `rnnkit train sort --...`
        length: int = option(10, "length of each sequence to sort")
        batch_size: int = option(64, "sequences per step, summed over all processes")

    @register_task
    class SortTask(Task):
        name = "sort"
        Config = SortConfig
        items_name = "samples"

        def __init__(self, config: SortConfig, run_dir: Path): ...
        def build_model(self) -> nn.Module: ...
        def train_batch(self, step, rank, world_size): ...      # this process's share of step `step`
        def loss(self, model, batch): ...                      # -> (mean loss, number of items)
        def evaluate(self, model, data=None): ...              # -> {"loss": ..., "accuracy": ...}

What the trainer calls, in order
--------------------------------
New run (`rnnkit train sort ...`):
    task = SortTask.create(config, run_dir)     # read data, build vocab / label map (all processes)
    task.save_artifacts(run_dir)                # process 0 only: write vocab.json, labels.json, ...
    torch.manual_seed(seed); model = task.build_model()
Resume and every later command (`--resume`, `eval`, `generate`, `predict`, `sort`):
    task = SortTask.from_run_dir(config, run_dir)   # rebuild from the saved artifacts; read data files
                                                    # lazily (on first train_batch / evaluate), since
                                                    # generate / predict never need them
Each step `step` (0-based), on every process:
    batch = task.train_batch(step, rank, world_size)   # tensors are moved to the device by the trainer
    loss, n_items = task.loss(model, batch)            # mean over the items; backward is the trainer's
Every `--eval-every` steps and at the end, on process 0, in eval mode under torch.no_grad():
    metrics = task.evaluate(model)                     # must contain "loss"; logged as val_loss, ...
    text = task.on_eval(model, step)                   # optional: e.g. an lm sample, printed if not None
Checkpoints, and after resume:
    task.data_state() / task.load_data_state(d)        # JSON-able data position (beyond `step`)
    task.tensor_state() / task.load_tensor_state(d)    # tensors carried between steps (lm hidden state)

Rules that make resume exact and processes agree
------------------------------------------------
* `train_batch(step, rank, world_size)` must be a pure function of (config, step, rank, world_size)
  plus whatever `data_state()` / `tensor_state()` restore. Draw randomness from
  `step_generator(seed, step, rank)`, never from the global RNG or Python's `hash()`. Return this
  process's rows only: with global batch B, each of `world_size` processes gets B // world_size
  (`shard_range` does the arithmetic and raises a clear error when B does not divide).
* `loss` must call `model(...)` (the forward of the module it is given): during distributed training
  `model` is a DistributedDataParallel wrapper and only its forward synchronises gradients. Return the
  *mean* loss over this process's items and how many items it covered (tokens for lm, samples
  otherwise; used for throughput). Stateful tasks (lm's truncated BPTT) keep the detached final hidden
  state in `self` inside `loss` and expose it through `tensor_state()` so it is checkpointed.
* `evaluate` gets the bare model (never the DDP wrapper), already on its device and in eval mode;
  move batches with `move_to(batch, device_of(model))`. `data=None` means the validation split;
  otherwise `data` is a path given by `rnnkit eval RUN_DIR --data PATH` (e.g. a test CSV). Return plain
  floats; "loss" is the mean per item in nats. Use no global RNG here, or fork it
  (`torch.random.fork_rng`), so evaluating does not change the training stream.
* Raise `UsageError` (from rnnkit.common.errors, re-exported here) for anything the user can fix:
  bad data paths, a batch size that does not divide, an empty file. The CLI prints it on one line, exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rnnkit.common.errors import UsageError  # re-exported: a task author needs only this module


def option(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    resumable: bool = False,
    parse: Callable[[str], Any] | None = None,
    choices: Callable[[], list[str]] | None = None,
    group: str | None = None,
) -> Any:
    """A dataclass field with its help text, from which the CLI derives a flag (rnnkit.cli.flags).
    `metavar` names the value in --help (default: its type, e.g. INT); `resumable` marks fields that
    may change without changing the model (TrainConfig's on `--resume`; a task's evaluation settings,
    which `rnnkit eval` and `rnnkit predict` accept as flags); `parse` turns the
    flag's text into the value (raising ValueError with the reason); `choices` lists, for the help,
    what the flag accepts when that is not a fixed Literal (e.g. `--cell`, whose registry may grow);
    `group` puts the flag in a section of its own in --help (e.g. the recurrent regularisers), which the
    config may describe in a class attribute `flag_groups = {group: description}`."""
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "metavar": metavar,
            "resumable": resumable,
            "parse": parse,
            "choices": choices,
            "group": group,
        },
    )


# name -> "module:Class", imported only when that task is used, so a task that is missing or broken
# never stops the CLI or the other tasks: rnnkit's own tasks, then those added by `register_task`.
# Installed packages add theirs as entry points in the "rnnkit.tasks" group (name = "module:Class").
TASKS: dict[str, str] = {
    "classify": "rnnkit.tasks.classify:ClassifyTask",
    "forecast": "rnnkit.tasks.forecast:ForecastTask",
    "lm": "rnnkit.tasks.lm:LMTask",
    "sort": "rnnkit.tasks.sort:SortTask",
}
ENTRY_POINTS = "rnnkit.tasks"


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a Task subclass available by its `name`, without editing rnnkit.

        @register_task
        class MyTask(Task):
            name = "mine"
            ...

    A run records the class's import path in config.json, so `rnnkit eval RUN` finds it again in a
    later process as long as its module can be imported (on PYTHONPATH or in the current directory)."""
    TASKS[cls.name] = f"{cls.__module__}:{cls.__qualname__}"
    return cls


def task_names() -> list[str]:
    """rnnkit's tasks, the registered ones and those installed packages declare as entry points."""
    from importlib.metadata import entry_points

    return sorted(set(TASKS) | {ep.name for ep in entry_points(group=ENTRY_POINTS)})


class Task(ABC):
    """One trainable task. See the module docstring for the call order and the rules."""

    name: ClassVar[str]  # registry key, e.g. "lm"; stored in config.json
    Config: ClassVar[type]  # frozen dataclass of model + data flags (fields via option())
    items_name: ClassVar[str] = "samples"  # unit of `n_items` for throughput: "tokens" or "samples"
    best_metric: ClassVar[str] = "loss"  # key of evaluate()'s dict that picks the best checkpoint
    higher_is_better: ClassVar[bool] = False  # True for e.g. best_metric = "accuracy"
    train_defaults: ClassVar[dict[str, Any]] = {}  # this task's own TrainConfig defaults, e.g. {"lr": 6e-3}
    evals_per_budget: ClassVar[int] = 10  # evaluations spread over a --time-budget without --steps/--eval-every
    # optional frozen dataclass of extra `rnnkit eval` flags (fields via option()); when set, evaluate()
    # is called with `options=` an instance of it, e.g. sort's `--n 5 10 20` and `--beam K`
    EvalOptions: ClassVar[type | None] = None

    def __init__(self, config: Any, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Any, run_dir: Path) -> Task:
        """A fresh training run: read the training data, build vocabularies / label maps.
        Runs on every process; must not write files (that is `save_artifacts`, process 0 only)."""
        return cls(config, run_dir)

    def save_artifacts(self, run_dir: Path) -> None:
        """Write what later commands need besides config and weights (vocab.json, labels.json).
        Called once on process 0 right after `create`. Write small JSON files; no pickle."""

    @classmethod
    def from_run_dir(cls, config: Any, run_dir: Path) -> Task:
        """Rebuild the task of an existing run from `config` (loaded from config.json) and the
        artifacts in `run_dir`. Used by --resume, eval and the task's own commands."""
        return cls(config, run_dir)

    # ---- model and data --------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on CPU, freshly initialised. The trainer seeds torch before calling it."""

    @abstractmethod
    def train_batch(self, step: int, rank: int, world_size: int) -> Any:
        """This process's share of the training batch for `step` (0-based): tensors, or a tuple /
        list / dict / NamedTuple of them, on CPU. Deterministic given the step (see module rules)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch as a 0-d tensor, number of items). Call `model(...)`."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: str | None = None, options: Any = None) -> dict[str, float]:
        """Metrics on the validation split (data=None) or on the file `data`; must include "loss".
        `options` is an `EvalOptions` instance from `rnnkit eval`'s flags (None during training)."""

    def on_eval(self, model: nn.Module, step: int) -> str | None:
        """Optional text printed after each evaluation (lm: a generated sample). Process 0 only."""
        return None

    def budget_steps(self) -> int | None:
        """The most optimizer steps worth training under a --time-budget without --steps, or None (the
        default: the whole budget). With a number, training ends at whichever comes first, and the
        learning rate decays over that and evaluations are spaced to it (classify: --max-epochs)."""
        return None

    # ---- state carried across steps (checkpointed) -----------------------------------------------
    def data_state(self) -> dict[str, Any]:
        """JSON-able data position beyond `step` (empty when train_batch depends only on step)."""
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Restore what `data_state` returned."""

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors carried from one step to the next, e.g. lm's detached hidden state (this process's
        rows). Saved per process with each checkpoint; names are free-form."""
        return {}

    def load_tensor_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `tensor_state` returned (tensors arrive on CPU)."""

    @classmethod
    def write_data(cls, data: Any, directory: Path) -> str:
        """Data given in memory from Python (`rnnkit.train(task, data=...)` with something other than a
        path): write it into `directory` in the task's file format and return the file's path, which
        becomes the config's `data`. Tasks that read no in-memory data keep this refusal."""
        raise UsageError(
            f"the {cls.name} task reads its data from files: pass data= a path, not a {type(data).__name__}"
        )

    def on_end(self, model: nn.Module) -> str | None:
        """Optional text printed when training ends (process 0, eval mode, no grad), e.g. forecast's
        table against its baselines; the run's summary keeps it as "report"."""
        return None


def load_task_class(name: str, where: str | None = None) -> type[Task]:
    """The Task subclass called `name`: registered, declared by an entry point, at `where` (the
    "module:Class" a run's config.json records), or `name` itself when it is "module:Class".
    A one-line UsageError if it is missing or broken."""
    from importlib.metadata import entry_points

    path = TASKS.get(name) or next((ep.value for ep in entry_points(group=ENTRY_POINTS) if ep.name == name), None)
    path = path or where or (name if ":" in name else None)
    if path is None:
        raise UsageError(f"unknown task {name!r}; choose from {', '.join(task_names())}, or give module:Class")
    module_name, _, class_name = path.partition(":")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise UsageError(f"task {name!r} is not available: {e}") from None
    cls: Any = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UsageError(f"task {name!r}: {module_name} has no Task subclass {class_name}")
    return cls


def _import(module_name: str):
    """Import `module_name`, looking in the current directory too (a user's task beside their runs)."""
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        if "" in sys.path or "." in sys.path:
            raise
        sys.path.append(".")
        return importlib.import_module(module_name)


# ---- helpers for task authors ------------------------------------------------------------------
def step_generator(seed: int, step: int, rank: int = 0, stream: str = "train") -> torch.Generator:
    """A torch.Generator seeded from (seed, step, rank, stream) through sha256, so each step's data
    is reproducible on any process and after resume, independent of everything else."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def shard_range(batch_size: int, rank: int, world_size: int) -> range:
    """Rows [start, stop) of a global batch that process `rank` of `world_size` owns."""
    if batch_size % world_size:
        raise UsageError(f"batch size {batch_size} must be divisible by the {world_size} processes")
    per = batch_size // world_size
    return range(rank * per, (rank + 1) * per)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in a tensor / tuple / NamedTuple / list / dict to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj
