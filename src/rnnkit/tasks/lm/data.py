"""The lm task's data: the vocabulary (characters or bytes <-> ids) and the corpus (a file, a folder,
a named download, or the Python standard library's source), split into training and validation text.

>>> vocab = Vocab.from_text("hello")
>>> vocab.encode("hell"), vocab.decode([3, 2])
([1, 0, 2, 2], 'ol')
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write_text
from rnnkit.tasks.download import RemoteFile

if TYPE_CHECKING:
    from rnnkit.tasks.lm.task import LMConfig


# ---- vocabulary -------------------------------------------------------------------------------------
class Vocab:
    """Characters (or the 256 byte values) <-> token ids. Id order is sorted character order."""

    def __init__(self, tokens: list[str] | None):
        # tokens=None: byte vocabulary, id = byte value
        self.is_bytes = tokens is None
        self.tokens = tokens
        self.index = {} if tokens is None else {c: i for i, c in enumerate(tokens)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(sorted(set(text)))

    @classmethod
    def of_bytes(cls) -> Vocab:
        return cls(None)

    def __len__(self) -> int:
        return 256 if self.tokens is None else len(self.tokens)

    def encode(self, text: str | bytes, source: str = "text") -> list[int]:
        """Token ids of `text`; a character outside the vocabulary is a UsageError naming it."""
        return self.encode_tensor(text, source).tolist()

    def encode_tensor(self, text: str | bytes, source: str = "text") -> Tensor:
        """Token ids of `text` as a (N,) int64 tensor (vectorised: corpora are megabytes)."""
        if self.tokens is None:
            raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        if isinstance(text, bytes):
            raise TypeError("a character vocabulary encodes str, got bytes")
        codes = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
        table = torch.tensor([ord(c) for c in self.tokens], dtype=torch.int64)  # sorted code points
        ids = torch.searchsorted(table, codes).clamp_(max=len(table) - 1)
        bad = (table[ids] != codes).nonzero()
        if len(bad):
            c = chr(int(codes[bad[0, 0]]))
            raise UsageError(
                f"{source} has the character {c!r} (U+{ord(c):04X}), which is not in the model's "
                f"vocabulary of {len(self)} characters"
            )
        return ids

    def decoder(self) -> Decoder:
        """A streaming decoder: ids in, text out (bytes are joined into UTF-8 characters as they complete)."""
        return Decoder(self)

    def decode(self, ids: list[int]) -> str:
        d = self.decoder()
        return d(ids) + d.flush()

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bytes"} if self.is_bytes else {"kind": "chars", "chars": self.tokens}

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str) -> Vocab:
        if doc.get("kind") == "bytes":
            return cls.of_bytes()
        chars = doc.get("chars")
        if (
            doc.get("kind") != "chars"
            or not isinstance(chars, list)
            or not all(isinstance(c, str) and len(c) == 1 for c in chars)
        ):
            raise UsageError(f'{source} is damaged (expected {{"kind": "chars", "chars": [...]}})')
        return cls(chars)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), ensure_ascii=True) + "\n")

    @staticmethod
    def read_json(path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path} is missing; the run directory is incomplete") from None
        except ValueError:
            raise UsageError(f"{path} is not valid JSON; the run directory is damaged") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{path} is damaged (expected a JSON object)")
        return doc

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls.from_json(cls.read_json(path), str(path))


class Decoder:
    """Ids -> text, one call per step. Byte vocabularies may need several bytes for one character."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if vocab.is_bytes else None

    def __call__(self, ids: list[int]) -> str:
        if self.utf8 is not None:
            return self.utf8.decode(bytes(ids))
        tokens = self.vocab.tokens
        assert tokens is not None  # a character vocabulary: a byte one decodes through utf8 above
        return "".join(tokens[i] for i in ids)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True) if self.utf8 is not None else ""


# ---- corpus -----------------------------------------------------------------------------------------
DATASETS: dict[str, RemoteFile] = {
    "tinyshakespeare": RemoteFile(
        "tinyshakespeare",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "sha256",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "tinyshakespeare.txt",
    ),
}


# tests and installed packages are not the standard library; `encodings` is mostly generated codec
# tables (hex literals), which would teach the model tables instead of Python
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def stdlib_corpus(max_bytes: int) -> str:
    """The running interpreter's standard-library source: *.py files (tests, site-packages and codec
    tables left out) ordered by the sha256 of their relative path, each file taken whole while the total stays within
    `max_bytes`. The same text on every run of the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    files.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    parts, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_bytes:
            continue
        try:
            parts.append(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):  # a handful of legacy-encoded files: not part of the corpus
            continue
        total += size
    if not parts:
        raise UsageError(f"no Python source found under {root} for the default corpus; pass --data PATH")
    return "".join(parts)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UsageError(f"--data {path}: the folder has no files")
        return files
    raise UsageError(f"--data {path}: no such file or folder (or use a dataset name: {', '.join(DATASETS)})")


def read_corpus(config: LMConfig) -> str | bytes:
    """The whole corpus: str of characters, or bytes with --bytes."""
    if config.data is None:
        text = stdlib_corpus(config.corpus_bytes)
        return text.encode("utf-8") if config.bytes else text
    path = Path(config.data)
    if config.data in DATASETS and not path.exists():
        path = DATASETS[config.data].fetch()
    raw_chunks: list[bytes] = []
    text_chunks: list[str] = []
    for file in _text_files(path):
        raw = file.read_bytes()
        if config.bytes:
            raw_chunks.append(raw)
            continue
        try:
            text_chunks.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(
                f"{file} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                f"convert it, or train on raw bytes with --bytes"
            ) from None
    corpus: str | bytes = b"".join(raw_chunks) if config.bytes else "".join(text_chunks)
    if len(corpus) < 2:
        raise UsageError(f"--data {path}: the text is empty")
    return corpus


def split(corpus: str | bytes, val_fraction: float) -> tuple[str | bytes, str | bytes]:
    """(train, val): the first 1 - val_fraction of the text and the rest (nanoGPT's split)."""
    train, val, _ = split_test(corpus, val_fraction, 0.0)
    return train, val


def split_test(
    corpus: str | bytes, val_fraction: float, test_fraction: float
) -> tuple[str | bytes, str | bytes, str | bytes]:
    """(train, val, test): the last `test_fraction` of the text is the test text, the `val_fraction`
    before it validation, the rest training (0.1 and 0.1: the 80/10/10 split of Karpathy, Johnson &
    Fei-Fei 2015)."""
    n = len(corpus)
    val_start, test_start = int(n * (1.0 - val_fraction - test_fraction)), int(n * (1.0 - test_fraction))
    return corpus[:val_start], corpus[val_start:test_start], corpus[test_start:]
