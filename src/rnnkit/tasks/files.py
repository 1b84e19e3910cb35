"""Files of the tasks and the engine: atomic writes, and downloads into the cache.

Atomic writes (the temporary file, fsync, rename sequence) mean a crash never leaves half a file; used by
tasks (downloaded data sets, vocabularies) and by the engine (checkpoints, config.json). `fetch` downloads
a data set once into `cache_dir()` and checks it against its published checksum before it appears.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from pathlib import Path

from rnnkit.tasks.base import UsageError


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync the file, then atomically replace `path` with it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; make them like any other
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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


def fetch(url: str, dest: Path, algorithm: str, digest: str, name: str | None = None) -> Path:
    """`dest`, downloaded from `url` unless it is already there with the checksum `digest` (`algorithm`
    is a hashlib name). The download is checked before it appears at `dest` (atomically); a failure or a
    checksum mismatch is a one-line UsageError naming `name` (default: the file's name) and leaves
    nothing behind. file:// URLs work (tests, mirrors)."""
    dest = Path(dest)
    name = name or dest.name
    if dest.is_file() and file_digest(dest, algorithm) == digest:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {dest}", file=sys.stderr)

    def download(tmp: Path) -> None:
        hasher = hashlib.new(algorithm)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != digest:
            raise UsageError(f"checksum mismatch for {name} from {url}: {algorithm} {hasher.hexdigest()}, expected {digest}; "
                             f"refusing to use it, the download was discarded")

    try:
        atomic_write(dest, download)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError; IncompleteRead is neither
        raise UsageError(f"could not download {name} from {url} ({getattr(e, 'reason', e)}); download it "
                         f"yourself and pass --data PATH") from None
    return dest
