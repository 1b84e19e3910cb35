"""Engine: one task-agnostic trainer, checkpoints, run directories, distributed setup.

From Python: `rnnkit.fit(model, data, ...)` for a model of your own, `rnnkit.train(task, ...)` for a task
(engine/fit.py). Task authors need: `Task`, `register_task`, `option`, `UsageError`, and the helpers
`step_generator`, `shard_range`, `move_to`, `device_of` (all documented in tasks/base.py, where they live).
"""
from rnnkit.engine.errors import CheckpointError
from rnnkit.tasks.base import (  # re-exported for task authors
    TASKS, Task, UsageError, device_of, load_task_class, move_to, option, register_task, shard_range,
    step_generator,
)

__all__ = [
    "TASKS", "CheckpointError", "Task", "UsageError", "device_of", "load_task_class", "move_to", "option",
    "register_task", "shard_range", "step_generator",
]
