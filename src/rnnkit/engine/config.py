"""Frozen config dataclasses <-> JSON: what a run's config.json holds, checked when it is read back.

The command-line flags are derived from the same dataclasses in cli/flags.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rnnkit.engine.errors import UsageError


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build `cls` from a dict (e.g. config.json), refusing unknown keys with a clear message.
    Keys missing from `values` take their defaults (configs written by older versions still load)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: {e}") from None


def from_saved(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """`from_dict` for a config read back from a run's config.json: a config class may define
    `upgrade_saved(values) -> values`, which renames the keys of earlier versions and pins the values
    their defaults had, so a run keeps the model it was trained with when a default changes."""
    upgrade = getattr(cls, "upgrade_saved", None)
    return from_dict(cls, upgrade(dict(values)) if upgrade else values, source)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
