"""Files the tasks download: one `RemoteFile` type for every data set, fetched once into the cache.

A `RemoteFile` names a published file (its URL and checksum) and where it lives under the cache
directory (`$RNNKIT_CACHE`, default ~/.cache/rnnkit). `fetch()` downloads it on first use, checks
it against the checksum before it appears (atomically), and returns its path; later calls find it
there. file:// URLs work (tests, mirrors).

    TINY_SHAKESPEARE = RemoteFile("tinyshakespeare", "https://.../input.txt", "sha256", "86c4...",
                                  "tinyshakespeare.txt")
    text = TINY_SHAKESPEARE.fetch().read_text()
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write


def cache_dir() -> Path:
    """Where downloaded data sets live: $RNNKIT_CACHE, default ~/.cache/rnnkit."""
    return Path(os.environ.get("RNNKIT_CACHE") or Path.home() / ".cache" / "rnnkit")


def file_digest(path: Path, algorithm: str) -> str:
    """The hex `algorithm` (a hashlib name) checksum of the file at `path`."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


@dataclass(frozen=True)
class RemoteFile:
    """A published file, downloaded once into the cache and verified against its checksum."""

    name: str  # what messages call it, e.g. "tinyshakespeare" or "AG News train.csv"
    url: str  # where it comes from (file:// works, for tests and mirrors)
    algorithm: str  # hashlib name of the published checksum, e.g. "sha256"
    digest: str  # the published checksum, hex
    cache_path: str  # where it lives under cache_dir(), e.g. "ag_news/train.csv"

    @property
    def path(self) -> Path:
        """The file's place in the cache (it may not be there yet)."""
        return cache_dir() / self.cache_path

    def fetch(self) -> Path:
        """`self.path`, downloaded first unless it is already there with the right checksum. A failed
        download or a checksum mismatch is a one-line UsageError naming the file; nothing is left behind."""
        dest = self.path
        if dest.is_file() and file_digest(dest, self.algorithm) == self.digest:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {self.url} -> {dest}", file=sys.stderr)

        def download(tmp: Path) -> None:
            hasher = hashlib.new(self.algorithm)
            with urllib.request.urlopen(self.url, timeout=60) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != self.digest:
                raise UsageError(
                    f"checksum mismatch for {self.name} from {self.url}: {self.algorithm} "
                    f"{hasher.hexdigest()}, expected {self.digest}; refusing to use it, the "
                    f"download was discarded"
                )

        try:
            atomic_write(dest, download)
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError; IncompleteRead is neither
            raise UsageError(
                f"could not download {self.name} from {self.url} ({getattr(e, 'reason', e)}); "
                f"download it yourself and pass --data PATH"
            ) from None
        return dest
