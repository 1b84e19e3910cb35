"""Engine: one task-agnostic trainer, checkpoints, run directories, distributed setup.

Task authors need: `Task`, `TASKS`, `option`, `UsageError`, and the helpers `step_generator`,
`shard_range`, `move_to`, `device_of` (all documented in tasks/base.py, where they live).
"""
from rnnkit.engine.errors import CheckpointError
from rnnkit.tasks.base import (  # re-exported for task authors
    TASKS, Task, UsageError, device_of, load_task_class, move_to, option, shard_range, step_generator,
)

__all__ = [
    "CheckpointError", "TASKS", "Task", "UsageError", "device_of", "load_task_class", "move_to", "option",
    "shard_range", "step_generator",
]
