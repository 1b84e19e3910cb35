"""The classify task's data: CSV files of `label,text[,text...]` rows -> byte tensors, lengths and labels.

A row's text is its text fields joined by one space; a label is a class name or a 1-based class number.
Class names come from a `classes.txt` (one name a line) in the data folder or next to the CSV; without
one, the distinct labels of the training file are the classes (numbers sorted numerically, names
alphabetically). Without `--data` the AG News CSVs are downloaded once into the cache. A row goes to
the validation split when the sha256 of its text falls below `--val-fraction`: the same rows on every
machine and run, and duplicate texts never straddle the split.

>>> x, lengths = encode([b"hi", "été".encode()], seq_len=4)
>>> x.tolist(), lengths.tolist()
([[104, 105, 0, 0], [195, 169, 116, 195]], [2, 4])
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write_text
from rnnkit.tasks.download import RemoteFile

if TYPE_CHECKING:
    from rnnkit.tasks.classify.task import ClassifyConfig

CLASSES_FILE = "classes.txt"  # optional next to the data: one class name a line, class 1 first
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


class Rows(NamedTuple):
    texts: list[bytes]  # UTF-8 bytes of each text (text fields joined by one space)
    labels: list[str]  # the label field of each row, as written
    lines: list[int]  # the line of each row in its file, for messages
    skipped: int  # malformed rows skipped (only with --skip-bad-rows)


class Split(NamedTuple):
    x: Tensor  # (N, seq_len) uint8 bytes, zero after each text's end
    lengths: Tensor  # (N,) int64 in [1, seq_len]
    y: Tensor  # (N,) int64 class index


def read_rows(path: Path, skip_bad_rows: bool) -> Rows:
    """Every row of CSV `path` as (text bytes, label). A bad row (field count different from the first
    row's, fewer than 2 fields, empty text, invalid UTF-8) raises a UsageError naming file and line,
    unless `skip_bad_rows`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise UsageError(f"{path} is empty")
    texts, labels, lines, skipped = [], [], [], 0
    expected = None  # field count of the first good row

    def bad(line: int, why: str) -> None:
        nonlocal skipped
        if not skip_bad_rows:
            raise UsageError(f"{path}, line {line}: {why} (fix the row, or pass --skip-bad-rows to skip such rows)")
        skipped += 1

    for line, fields in _csv_records(raw, bad):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        if expected is None and len(fields) >= 2:
            expected = len(fields)
        if len(fields) < 2 or len(fields) != expected:
            bad(line, f"expected {expected or 'at least 2'} fields (label, text...), got {len(fields)}")
            continue
        label, text = fields[0].strip(), " ".join(fields[1:])
        if not label:
            bad(line, "empty label")
            continue
        if not text.strip():
            bad(line, "empty text")
            continue
        texts.append(text.encode("utf-8"))
        labels.append(label)
        lines.append(line)
    if not texts:
        raise UsageError(f"{path} has no usable rows ({skipped} bad rows skipped)")
    return Rows(texts, labels, lines, skipped)


def _csv_records(raw: bytes, bad) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number where the record ends, fields) of each CSV record in `raw`; a line that is
    not UTF-8 is reported to `bad(line, why)` and left out. A UTF-8 byte-order mark is ignored."""
    current = 0

    def lines() -> Iterator[str]:
        nonlocal current
        for number, chunk in enumerate(io.BytesIO(raw), start=1):
            try:
                text = chunk.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad(number, f"invalid UTF-8 at byte {e.start} of the line")
                continue
            current = number
            yield text

    reader = csv.reader(lines())
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            bad(current, f"malformed CSV ({e})")
            continue
        yield current, fields


def class_names_for(rows: Rows, classes_file: Path | None) -> list[str]:
    """Class names: classes.txt when given, else the distinct labels (numbers numerically)."""
    if classes_file is not None:
        names = [n.strip() for n in classes_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(names) < 2:
            raise UsageError(f"{classes_file} must name at least 2 classes, one a line; it has {len(names)}")
        return names
    distinct = set(rows.labels)
    if len(distinct) < 2:
        raise UsageError(f"the training data has only one label ({next(iter(distinct))!r}); need at least 2")
    if all(_is_int(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_indices(labels: list[str], names: list[str]) -> list[int | None]:
    """Index of each label: its name in `names`, or a 1-based class number; None when unknown."""
    by_name = {name: i for i, name in enumerate(names)}
    numbers_are_names = all(_is_int(n) for n in names)
    out: list[int | None] = []
    for label in labels:
        if label in by_name:
            out.append(by_name[label])
        elif not numbers_are_names and _is_int(label) and 1 <= int(label) <= len(names):
            out.append(int(label) - 1)
        else:
            out.append(None)
    return out


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def to_split(rows: Rows, names: list[str], path: Path, config: ClassifyConfig) -> tuple[Split, Rows]:
    """Encode `rows` with labels mapped to `names`; rows with unknown labels are bad rows. Returns the
    split and the rows it holds (with `skipped` counting every bad row)."""
    indices = label_indices(rows.labels, names)
    if None in indices:
        k = indices.index(None)
        if not config.skip_bad_rows:
            raise UsageError(
                f"{path}, line {rows.lines[k]}: unknown label {rows.labels[k]!r}; the classes are "
                f"{', '.join(names)} (or 1..{len(names)}) (fix the row, or pass --skip-bad-rows)"
            )
        keep = [k for k, i in enumerate(indices) if i is not None]
        if not keep:
            raise UsageError(f"{path} has no row with a known label; the classes are {', '.join(names)}")
        rows = Rows(
            [rows.texts[k] for k in keep],
            [rows.labels[k] for k in keep],
            [rows.lines[k] for k in keep],
            rows.skipped + len(indices) - len(keep),
        )
        indices = [indices[k] for k in keep]
    x, lengths = encode(rows.texts, config.seq_len)
    return Split(x, lengths, torch.tensor(indices, dtype=torch.int64)), rows


def encode(texts: list[bytes], seq_len: int) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes -> (N, seq_len) uint8 cut or zero-padded, and the (N,) true lengths (at most seq_len)."""
    x = np.zeros((len(texts), seq_len), dtype=np.uint8)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        cut = text[:seq_len]
        x[i, : len(cut)] = np.frombuffer(cut, dtype=np.uint8)
        lengths[i] = len(cut)
    return torch.from_numpy(x), torch.from_numpy(lengths)


def in_validation(text: bytes, fraction: float) -> bool:
    """True for the rows of the validation split: a sha256 of the text, so stable everywhere."""
    value = int.from_bytes(hashlib.sha256(text).digest()[:8], "big") / 2.0**64
    return value < fraction


# ---- where the files are ------------------------------------------------------------------------------
class DataFiles(NamedTuple):
    train: Path  # training CSV
    test: Path | None  # held-out CSV (`eval --data FOLDER` uses it)
    classes: Path | None  # classes.txt, when there is one


# The original AG News CSVs (Zhang et al. 2015) at the mirror torchtext's AG_NEWS loader uses, with its
# published MD5 for train.csv and the SHA-256 of the original test.csv.
AG_NEWS: tuple[RemoteFile, ...] = (
    RemoteFile(
        "AG News train.csv",
        "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/train.csv",
        "md5",
        "b1a00f826fdfbd249f79597b59e1dc12",
        "ag_news/train.csv",
    ),
    RemoteFile(
        "AG News test.csv",
        "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/test.csv",
        "sha256",
        "521465c2428ed7f02f8d6db6ffdd4b5447c1c701962353eb2c40d548c3c85699",
        "ag_news/test.csv",
    ),
)


def ag_news(files: tuple[RemoteFile, ...] = AG_NEWS) -> Path:
    """The AG News folder in the cache (train.csv, test.csv, classes.txt), downloading what is missing."""
    folder = None
    for remote in files:
        folder = remote.fetch().parent
    if folder is None:
        raise ValueError("ag_news() needs at least one file to fetch")
    classes = folder / CLASSES_FILE
    if not classes.is_file():
        atomic_write_text(classes, "\n".join(AG_NEWS_CLASSES) + "\n")
    return folder


def data_files(data: str | None) -> DataFiles:
    """Resolve `--data`: a folder (train.csv, test.csv, classes.txt), one CSV, or None (AG News)."""
    path = Path(data) if data is not None else ag_news()
    if path.is_dir():
        train, test = path / "train.csv", path / "test.csv"
        if not train.is_file():
            raise UsageError(f"{path} has no train.csv; give a folder with train.csv (and test.csv) or one CSV")
        return DataFiles(train, test if test.is_file() else None, _classes_near(path))
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    return DataFiles(path, None, _classes_near(path.parent))


def _classes_near(folder: Path) -> Path | None:
    return folder / CLASSES_FILE if (folder / CLASSES_FILE).is_file() else None
