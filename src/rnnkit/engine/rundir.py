"""Run directories: everything a run needs to be evaluated, resumed or used later.

RUN_DIR/
  config.json                 {"rnnkit": version, "task": "lm", "task_config": {...}, "train": {...}}
  <task artifacts>            vocab.json, labels.json, ... (Task.save_artifacts)
  metrics.jsonl               one JSON object per log line / evaluation
  curves.png                  train and validation loss vs step and vs wall time
  checkpoints/last.safetensors  latest checkpoint (resume from here)
  checkpoints/best.safetensors  best evaluation so far (eval and task commands use this)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnkit.common.files import atomic_write, atomic_write_text
from rnnkit.engine.errors import UsageError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunInfo:
    path: Path  # the run directory
    task: str  # task registry name
    task_config: dict[str, Any]  # the task's config fields, as saved
    train_config: dict[str, Any]  # the trainer's config fields, as saved
    task_class: str | None = None  # "module:Class" of the task, where config.json records it

    @property
    def last(self) -> Path:
        return self.path / CHECKPOINTS / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.path / CHECKPOINTS / "best.safetensors"


def rnnkit_version() -> str:
    """The installed distribution's version, else rnnkit.__version__ (running from a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("rnnkit")
    except metadata.PackageNotFoundError:
        import rnnkit

        return getattr(rnnkit, "__version__", "unknown")


def default_run_dir(task: str) -> Path:
    return Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def class_path(cls: type) -> str:
    """ "module:QualName", the import path config.json records for a run's task or model class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def write_config(
    run_dir: Path, task: str, task_config: dict, train_config: dict, version: str, task_class: str | None = None
) -> None:
    """config.json; `task_class` ("module:Class") lets later commands find a task rnnkit does not ship."""
    doc = {"rnnkit": version, "task": task, "task_config": task_config, "train": train_config}
    if task_class:
        doc["task_class"] = task_class
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(doc, indent=2) + "\n")


def read_run(run_dir: str | Path) -> RunInfo:
    """Read RUN_DIR/config.json; a one-line UsageError when the directory is missing or foreign."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"run directory {path} does not exist")
    cfg = path / CONFIG
    if not cfg.is_file():
        raise UsageError(f"{path} is not an rnnkit run directory (no {CONFIG})")
    try:
        doc = json.loads(cfg.read_text())
        return RunInfo(
            path=path,
            task=str(doc["task"]),
            task_config=dict(doc["task_config"]),
            train_config=dict(doc["train"]),
            task_class=doc.get("task_class"),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{cfg} is not an rnnkit run config ({type(e).__name__}: {e})") from None


class MetricsLog:
    """Append-only RUN_DIR/metrics.jsonl, flushed per line so a crash loses at most one line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a crash
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run re-logs them), atomically."""
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(metrics: MetricsLog, png: Path) -> None:
    """Train and validation loss against step and against wall time, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics.rows()
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, label in ((axes[0], "step", "step"), (axes[1], "time", "wall time (s)")):
        if train:
            ax.plot([r[x] for r in train], [r["train_loss"] for r in train], label="train", lw=1)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


@dataclass(frozen=True)
class LoadedRun:
    info: RunInfo  # what config.json says
    task: Any  # the Task, rebuilt with Task.from_run_dir
    model: Any  # the task's model with the checkpoint's weights, in eval mode
    checkpoint: Path  # the checkpoint file the weights came from
    step: int  # training step at which that checkpoint was written


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
    """Everything a later command needs, from the run directory alone:

        run = load_run("runs/lm-20250101-120000")
        run.task.evaluate(run.model)

    `checkpoint` is "best" (falls back to "last" when no evaluation has finished) or "last"."""
    from rnnkit.engine.checkpoint import load_model_weights
    from rnnkit.engine.config import from_saved
    from rnnkit.engine.distributed import resolve_device
    from rnnkit.tasks.base import load_task_class

    info = read_run(run_dir)
    if info.task == "fit" and not info.task_class:
        raise UsageError(
            f"{info.path} was trained from Python with rnnkit.fit on a "
            f"{info.task_config.get('model', 'user')} model; load it with "
            f"rnnkit.load({str(info.path)!r}, model=...) and evaluate it in Python"
        )
    task_cls = load_task_class(info.task, info.task_class)
    config = from_saved(task_cls.Config, info.task_config, source=f"{info.path / CONFIG}")
    path = {"best": info.best, "last": info.last}[checkpoint]
    if checkpoint == "best" and not path.exists():
        path = info.last
    if not path.exists():
        raise UsageError(f"{info.path} has no checkpoint yet ({path.name} missing in {path.parent})")
    task = task_cls.from_run_dir(config, info.path)
    model = task.build_model()
    state = load_model_weights(path, model)
    model.to(resolve_device(device)).eval()
    return LoadedRun(info=info, task=task, model=model, checkpoint=path, step=int(state.get("step", 0)))
