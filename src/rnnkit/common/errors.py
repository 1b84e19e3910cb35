"""Errors that speak to the user.

Raise `UsageError` for anything a person can fix (a bad flag value, a missing file, a run directory
from another task). The CLI catches it at the top and prints one line, `rnnkit: error: <message>`,
with exit code 2 and no traceback. Say what was wrong, where it came from, and what would work:

    raise UsageError(f"--batch-size must be a multiple of the 2 processes, got 7")
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits with code 2."""
