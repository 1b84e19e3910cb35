"""Reading stdin one text line at a time, as UTF-8 whatever the locale, for `rnnkit predict` and `rnnkit sort`.

Lines are yielded as they arrive (so `rnnkit sort` answers each line before the next is typed), without
their line ending. A line that is not UTF-8 stops with a UsageError naming its line number.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from rnnkit.common.errors import UsageError


def stdin_lines() -> Iterator[str]:
    """Each line of stdin, decoded as UTF-8, without its line ending."""
    raw_lines = getattr(sys.stdin, "buffer", None)
    if raw_lines is None:  # stdin replaced by a text stream (an embedding program, io.StringIO): already decoded
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    for number, raw in enumerate(raw_lines, start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin, line {number}: invalid UTF-8 at byte {e.start} of the line") from None
