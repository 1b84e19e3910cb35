"""Helpers every floor above core shares: the user-error type and atomic file writes.

Tasks, the engine and the CLI import these from here; nothing here imports them.
"""

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write, atomic_write_text

__all__ = ["UsageError", "atomic_write", "atomic_write_text"]
