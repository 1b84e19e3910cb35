"""The classify task (many-to-one): labelled text in, one class per text out, read byte by byte.

The seed deck's many-to-one example is the starting point: 256 bytes of text, one-hot, through a
bidirectional multi-layer RNN; the forward direction's output at the last byte and the backward
direction's output at the first byte are each projected to E_DIM = 128, added, and projected to the
classes. Here "last" is each text's own last byte (true lengths go to the layer, so padding is never
read as text), and the bytes are all 256 values of UTF-8 (bytes >= 128 are symbols of their own).

    rnnkit train classify --data ag_news/                    folder with train.csv, test.csv, classes.txt
    rnnkit eval RUN_DIR --data ag_news/test.csv              accuracy, per-class P/R/F1, confusion.png
    echo "Stocks fall as oil hits a record" | rnnkit predict RUN_DIR

Data. A CSV row is `label,text[,text...]` (AG News: `"3","title","description"`); a row's text is its
text fields joined by one space. A label is a class name or a 1-based class number. Class names come
from a `classes.txt` (one name a line) in the data folder or next to the CSV; without one, the distinct
labels of the training file are the classes (numbers sorted numerically, names alphabetically).
Without `--data` the AG News CSVs are downloaded once into the cache (`$RNNKIT_CACHE`, default
~/.cache/rnnkit) and checked against their published checksums. A row goes to the validation split
when the sha256 of its text falls below `--val-fraction`: the same rows on every machine and run, and
duplicate texts never straddle the split.

Model. The defaults are the seed's model (one-hot bytes, a 3-layer bidirectional LSTM of 512, the
forward output at the last byte plus the backward output at the first). What reached the best AG News
accuracy per CPU minute is a small learned variant (README, "Text classification"):
`--input embedding --ngrams 4 --patch 8 --cell gru --hidden 128 --layers 1 --pooling mean --dropout 0.2`.

    x (B, T) bytes -> input vectors (B, T, V)     one-hot (V = 256) or a learned embedding of each byte,
                                                  plus hashed embeddings of the 2..ngrams bytes ending there
                                                  and of the word so far (`--words`) and the pair
                                                  (previous word, word so far) (`--word-pairs`), all summed
                   -> (B, T/patch, patch*V)       `--patch` consecutive bytes per RNN step (1 = seed)
                   -> bidirectional RNN (B, S, 2H) with each text's true length
    ends:      f = out[b, len_b - 1, :H], g = out[b, 0, H:]        (the seed)
    max/mean:  f, g = max or mean over each text's valid steps of the forward / backward halves
    logits = W_c (W_f f + W_g g) + b                              (B, classes)

>>> import torch
>>> model = ByteClassifier(ClassifyConfig(hidden=8, e_dim=8), num_classes=3)
>>> logits, loss = model(torch.randint(0, 256, (2, 12)), torch.tensor([12, 5]), torch.tensor([0, 2]))
>>> tuple(logits.shape), loss.dim()
((2, 3), 0)
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import rnnkit
from rnnkit.tasks.base import Task, UsageError, device_of, move_to, option, shard_range, step_generator
from rnnkit.tasks.files import atomic_write, atomic_write_text, cache_dir, fetch

LABELS_FILE = "labels.json"    # artifact in the run directory: the class names, in index order
CLASSES_FILE = "classes.txt"   # optional next to the data: one class name a line, class 1 first
VOCAB = 256                    # byte values; UTF-8 bytes >= 128 are symbols of their own


@dataclass(frozen=True)
class ClassifyConfig:
    data: str | None = option(None, "folder with train.csv (+ test.csv, classes.txt) or one CSV of "
                                    "label,text rows; default: AG News, downloaded once into the cache")
    seq_len: int = option(256, "bytes of each text the model reads; longer texts are cut (the seed's 256)")
    val_fraction: float = option(0.05, "fraction of training rows held out for validation (by text hash)")
    skip_bad_rows: bool = option(False, "skip malformed CSV rows and report how many, instead of stopping")
    input: Literal["onehot", "embedding"] = option("onehot", "byte input: one-hot of depth 256 (the "
                                                                "seed) or a learned embedding")
    embed: int = option(64, "size of the learned byte embedding (--input embedding)")
    ngrams: int = option(1, "also add hashed embeddings of the 2..N bytes ending at each byte (1 = off; "
                            "needs --input embedding)")
    words: bool = option(False, "also add a hashed embedding of the word so far at each byte (the letters "
                                "and digits since the last other byte, at most 20; needs --input embedding)")
    word_pairs: bool = option(False, "also add a hashed embedding of (previous word, word so far) at each "
                                     "byte of a word (needs --words)")
    buckets: int = option(65536, "hash buckets shared by the n-gram and word embeddings")
    patch: int = option(1, "bytes per RNN step: their input vectors are concatenated (1 = the seed)")
    cell: Literal["lstm", "gru"] = option("lstm", "recurrent cell")
    hidden: int = option(512, "hidden size per direction (the seed's STATE_DIM is 512)")
    layers: int = option(3, "stacked bidirectional layers")
    pooling: Literal["ends", "max", "mean"] = option(
        "ends", "what each direction contributes: ends = forward at the last byte and backward at the "
               "first (the seed); max / mean = over each text's valid steps")
    e_dim: int = option(128, "each direction is projected to this size and the two are added (E_DIM)")
    dropout: float = option(0.0, "dropout on the inputs, between layers and before the classifier")
    batch_size: int = option(128, "texts per step, summed over all processes")
    eval_batch_size: int = option(512, "texts per forward pass in eval and predict", resumable=True)
    data_seed: int = option(0, "seed of the training order (the validation split never depends on it)")

    def __post_init__(self):
        for name in ("seq_len", "embed", "buckets", "patch", "hidden", "layers", "e_dim", "batch_size",
                     "eval_batch_size", "ngrams"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.word_pairs and not self.words:
            raise UsageError("--word-pairs needs --words")
        if (self.ngrams > 1 or self.words) and self.input == "onehot":
            raise UsageError("--ngrams > 1 and --words need --input embedding (hashed n-grams are learned "
                             "vectors); use --ngrams 1 --no-words with --input onehot")


# ---- data: files -> (texts, labels) -----------------------------------------------------------------
class Rows(NamedTuple):
    texts: list[bytes]   # UTF-8 bytes of each text (text fields joined by one space)
    labels: list[str]    # the label field of each row, as written
    lines: list[int]     # the line of each row in its file, for messages
    skipped: int         # malformed rows skipped (only with --skip-bad-rows)


class Split(NamedTuple):
    x: Tensor        # (N, seq_len) uint8 bytes, zero after each text's end
    lengths: Tensor  # (N,) int64 in [1, seq_len]
    y: Tensor        # (N,) int64 class index


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
    out = []
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


def to_split(rows: Rows, names: list[str], path: Path, config: "ClassifyConfig") -> tuple[Split, Rows]:
    """Encode `rows` with labels mapped to `names`; rows with unknown labels are bad rows. Returns the
    split and the rows it holds (with `skipped` counting every bad row)."""
    indices = label_indices(rows.labels, names)
    if None in indices:
        k = indices.index(None)
        if not config.skip_bad_rows:
            raise UsageError(f"{path}, line {rows.lines[k]}: unknown label {rows.labels[k]!r}; the classes are "
                             f"{', '.join(names)} (or 1..{len(names)}) (fix the row, or pass --skip-bad-rows)")
        keep = [k for k, i in enumerate(indices) if i is not None]
        if not keep:
            raise UsageError(f"{path} has no row with a known label; the classes are {', '.join(names)}")
        rows = Rows(*([column[k] for k in keep] for column in rows[:3]), rows.skipped + len(indices) - len(keep))
        indices = [indices[k] for k in keep]
    x, lengths = encode(rows.texts, config.seq_len)
    return Split(x, lengths, torch.tensor(indices, dtype=torch.int64)), rows


def encode(texts: list[bytes], seq_len: int) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes -> (N, seq_len) uint8 cut or zero-padded, and the (N,) true lengths (at most seq_len)."""
    x = np.zeros((len(texts), seq_len), dtype=np.uint8)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        cut = text[:seq_len]
        x[i, :len(cut)] = np.frombuffer(cut, dtype=np.uint8)
        lengths[i] = len(cut)
    return torch.from_numpy(x), torch.from_numpy(lengths)


def in_validation(text: bytes, fraction: float) -> bool:
    """True for the rows of the validation split: a sha256 of the text, so stable everywhere."""
    value = int.from_bytes(hashlib.sha256(text).digest()[:8], "big") / 2.0**64
    return value < fraction


# ---- data: where the files are ------------------------------------------------------------------------
class DataFiles(NamedTuple):
    train: Path            # training CSV
    test: Path | None      # held-out CSV (`eval --data FOLDER` uses it)
    classes: Path | None   # classes.txt, when there is one


@dataclass(frozen=True)
class Download:
    url: str        # where the file comes from (file:// works, for tests and mirrors)
    algorithm: str  # hashlib name of the published checksum
    digest: str     # the published checksum, hex


# The original AG News CSVs (Zhang et al. 2015) at the mirror torchtext's AG_NEWS loader uses, with its
# published MD5 for train.csv and the SHA-256 of the original test.csv (shared/data/README.md).
AG_NEWS: dict[str, Download] = {
    "train.csv": Download("https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/train.csv",
                          "md5", "b1a00f826fdfbd249f79597b59e1dc12"),
    "test.csv": Download("https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/test.csv",
                         "sha256", "521465c2428ed7f02f8d6db6ffdd4b5447c1c701962353eb2c40d548c3c85699"),
}
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


def ag_news(sources: dict[str, Download] | None = None) -> Path:
    """The AG News folder in the cache, downloading what is missing."""
    folder = cache_dir() / "ag_news"
    for name, download in (sources or AG_NEWS).items():
        fetch(download.url, folder / name, download.algorithm, download.digest)
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


# ---- model ---------------------------------------------------------------------------------------------
def masked_pool(x: Tensor, lengths: Tensor, how: str) -> Tensor:
    """Max or mean of x (B, S, C) over each row's first lengths[b] steps -> (B, C)."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths[:, None, None]  # (B, S, 1)
    if how == "max":
        return x.masked_fill(~valid, float("-inf")).amax(dim=1)
    return (x * valid).sum(dim=1) / lengths[:, None].to(x.dtype)


class ByteClassifier(nn.Module):
    """Bytes (B, T) and lengths (B,) -> class logits (B, K); see the module docstring for the equations."""

    def __init__(self, config: ClassifyConfig, num_classes: int):
        super().__init__()
        self.config = config
        c = config
        width = VOCAB if c.input == "onehot" else c.embed
        self.byte_embedding = nn.Embedding(VOCAB, c.embed) if c.input == "embedding" else None
        self.ngram_embedding = nn.Embedding(c.buckets, c.embed) if c.ngrams > 1 or c.words else None
        for table in (self.byte_embedding, self.ngram_embedding):
            if table is not None:  # N(0, 1) rows, summed and concatenated, would saturate the gates at the start
                nn.init.normal_(table.weight, std=0.1)
        self.rnn = rnnkit.LAYERS[c.cell](c.patch * width, c.hidden, c.layers, dropout=c.dropout, bidirectional=True)
        self.project_forward = nn.Linear(c.hidden, c.e_dim)
        self.project_backward = nn.Linear(c.hidden, c.e_dim)
        self.classifier = nn.Linear(c.e_dim, num_classes)
        self.dropout = nn.Dropout(c.dropout)

    def inputs(self, x: Tensor) -> Tensor:
        """(B, T) bytes -> (B, T, width) input vectors."""
        x = x.long()
        if self.byte_embedding is None:
            return F.one_hot(x, VOCAB).float()  # (B, T, 256)
        e = self.byte_embedding(x)  # (B, T, E)
        ids = []
        if self.config.ngrams > 1:
            ids.append(ngram_ids(x, self.config.ngrams, self.config.buckets))
        if self.config.words:
            ids.append(word_ids(x, self.config.buckets, pairs=self.config.word_pairs))
        if ids:
            e = e + self.ngram_embedding(torch.cat(ids, dim=2)).sum(dim=2)
        return e

    def forward(self, x: Tensor, lengths: Tensor, targets: Tensor | None = None):
        B, T = x.shape
        k = self.config.patch
        e = self.inputs(x)
        e = e * (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).unsqueeze(2)  # no padding in patches
        e = self.dropout(e)
        if T % k:
            e = F.pad(e, (0, 0, 0, k - T % k))
        steps = e.reshape(B, -1, k * e.shape[2])  # (B, S, k*width), S = ceil(T / k)
        step_lengths = (lengths + k - 1) // k
        out, _ = self.rnn(steps, lengths=step_lengths)  # (B, S, 2H)
        H = self.config.hidden
        if self.config.pooling == "ends":
            forward = out[torch.arange(B, device=x.device), step_lengths - 1, :H]  # each text's own last step
            backward = out[:, 0, H:]  # the backward direction ends at step 0
        else:
            forward = masked_pool(out[:, :, :H], step_lengths, self.config.pooling)
            backward = masked_pool(out[:, :, H:], step_lengths, self.config.pooling)
        e_sum = self.project_forward(forward) + self.project_backward(backward)  # (B, E_DIM)
        logits = self.classifier(self.dropout(e_sum))  # (B, K)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss


def ngram_ids(x: Tensor, n_max: int, buckets: int) -> Tensor:
    """Hash bucket of the n bytes ending at each position, n = 2..n_max: (B, T) -> (B, T, n_max - 1).
    Positions before the text's start read as symbol 256, so a 3-gram at position 1 differs from one
    in the middle. A polynomial hash modulo a prime, in int64 without overflow."""
    prime = 2_147_483_647
    h = x.long() + 1
    ids = []
    for k in range(1, n_max):
        previous = F.pad(x.long(), (k, 0), value=VOCAB)[:, : x.shape[1]]
        h = (h * 263 + previous + 1) % prime
        ids.append((h * 2654435761 + k) % prime % buckets)
    return torch.stack(ids, dim=2)


def word_ids(x: Tensor, buckets: int, longest: int = 20, pairs: bool = False) -> Tensor:
    """Hash bucket of the word so far at each position (B, T) -> (B, T, 1): the run of ASCII letters and
    digits ending there, up to `longest` bytes; a byte outside words gets its own bucket. With `pairs`,
    a second column (B, T, 2) hashes (previous word, word so far) inside words."""
    x = x.long()
    B, T = x.shape
    prime = 2_147_483_647
    is_word = ((x >= 48) & (x <= 57)) | ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122))  # 0-9 A-Z a-z
    h = x + 1 + 1000 * is_word
    alive = is_word
    for k in range(1, longest):
        previous = F.pad(x, (k, 0))[:, :T]
        alive = alive & F.pad(is_word, (k, 0))[:, :T]
        h = torch.where(alive, (h * 263 + previous + 1) % prime, h)
    ids = [(h * 2654435761 + 97) % prime % buckets]
    if pairs:
        steps = torch.arange(T, device=x.device).expand(B, T)
        is_end = is_word & ~F.pad(is_word, (0, 1))[:, 1:]  # last byte of a word
        last_end = torch.where(is_end, steps, -1).cummax(dim=1).values  # (B, T) latest word end at or before t
        previous_end = F.pad(last_end, (1, 0), value=-1)[:, :T]  # ... strictly before t: the previous word's
        previous_word = h.gather(1, previous_end.clamp(min=0))
        pair = (previous_word * 1_000_003 + h) % prime
        ok = is_word & (previous_end >= 0)
        ids.append(torch.where(ok, (pair * 2654435761 + 389) % prime % buckets, torch.zeros_like(h)))
    return torch.stack(ids, dim=2)


# ---- metrics ------------------------------------------------------------------------------------------
def confusion_matrix(y: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    return torch.bincount(y * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_metrics(confusion: Tensor, names: list[str]) -> dict[str, float]:
    """accuracy, macro F1 and precision / recall / F1 of each class from a confusion matrix."""
    cm = confusion.double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    out = {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1.mean())}
    for i, name in enumerate(names):
        out[f"precision[{name}]"] = float(precision[i])
        out[f"recall[{name}]"] = float(recall[i])
        out[f"f1[{name}]"] = float(f1[i])
    return out


def confusion_text(confusion: Tensor, names: list[str]) -> str:
    width = max(max(len(n) for n in names), len(str(int(confusion.max()))), 6)
    head = "true \\ predicted".ljust(width + 2) + " ".join(n.rjust(width) for n in names)
    rows = [names[i].ljust(width + 2) + " ".join(str(int(v)).rjust(width) for v in confusion[i])
            for i in range(len(names))]
    return "\n".join([head, *rows]) + "\n"


def plot_confusion(confusion: Tensor, names: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.numpy()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


@dataclass(frozen=True)
class ClassifyEvalOptions:
    skip_bad_rows: bool | None = option(None, "skip malformed rows of --data and report how many (default: "
                                              "what the run was trained with)")
    confusion: bool = option(True, "write the confusion matrix to RUN_DIR/confusion.txt and confusion.png")


# ---- the task -----------------------------------------------------------------------------------------
class ClassifyTask(Task):
    name = "classify"
    Config = ClassifyConfig
    items_name = "samples"
    best_metric = "accuracy"
    higher_is_better = True
    EvalOptions = ClassifyEvalOptions  # extra `rnnkit eval` flags

    def __init__(self, config: ClassifyConfig, run_dir: Path, names: list[str]):
        super().__init__(config, run_dir)
        self.names = names                       # class names, in index order
        self._train: Split | None = None         # loaded by create, or lazily for eval of the val split
        self._val: Split | None = None
        self._perm: tuple[int, Tensor] | None = None  # (epoch, permutation) cache for train_batch

    @classmethod
    def create(cls, config: ClassifyConfig, run_dir: Path) -> "ClassifyTask":
        files = data_files(config.data)
        rows = read_rows(files.train, config.skip_bad_rows)
        task = cls(config, run_dir, class_names_for(rows, files.classes))
        task._split_training_rows(rows, files.train)
        return task

    def save_artifacts(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / LABELS_FILE, json.dumps({"labels": self.names}, indent=2) + "\n")

    @classmethod
    def from_run_dir(cls, config: ClassifyConfig, run_dir: Path) -> "ClassifyTask":
        path = Path(run_dir) / LABELS_FILE
        try:
            names = json.loads(path.read_text(encoding="utf-8"))["labels"]
        except FileNotFoundError:
            raise UsageError(f"{path} is missing; the run directory is incomplete") from None
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path} is damaged (expected {{\"labels\": [names...]}})") from None
        return cls(config, run_dir, names)

    def _load_training_data(self) -> None:
        """Read the training file again (eval of the validation split after `from_run_dir`)."""
        files = data_files(self.config.data)
        self._split_training_rows(read_rows(files.train, self.config.skip_bad_rows), files.train)

    def _split_training_rows(self, rows: Rows, path: Path) -> None:
        split, rows = to_split(rows, self.names, path, self.config)
        if rows.skipped:
            print(f"classify: skipped {rows.skipped} bad rows of {path}", file=sys.stderr)
        is_val = torch.tensor([in_validation(text, self.config.val_fraction) for text in rows.texts])
        self._train = Split(*(t[~is_val] for t in split))
        self._val = Split(*(t[is_val] for t in split))
        if len(self._train.y) == 0:
            raise UsageError(f"{path}: no training rows left after holding out --val-fraction "
                             f"{self.config.val_fraction}")

    # ---- model and data ----
    def build_model(self) -> nn.Module:
        return ByteClassifier(self.config, len(self.names))

    def train_batch(self, step: int, rank: int, world_size: int) -> Split:
        if self._train is None:
            self._load_training_data()
        N = len(self._train.y)
        B = self.config.batch_size
        positions = torch.tensor([step * B + i for i in shard_range(B, rank, world_size)])
        epochs, offsets = positions // N, positions % N
        rows = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            chosen = epochs == epoch
            rows[chosen] = self._permutation(epoch)[offsets[chosen]]
        return self._batch(self._train, rows)

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = step_generator(self.config.data_seed, epoch, 0, stream="classify-epoch")
            self._perm = (epoch, torch.randperm(len(self._train.y), generator=g))
        return self._perm[1]

    @staticmethod
    def _batch(split: Split, rows: Tensor) -> Split:
        lengths = split.lengths[rows]
        return Split(split.x[rows, : int(lengths.max())], lengths, split.y[rows])

    def loss(self, model: nn.Module, batch: Split) -> tuple[Tensor, int]:
        _, loss = model(batch.x, batch.lengths, batch.y)
        return loss, len(batch.y)

    # ---- evaluation ----
    def evaluate(self, model: nn.Module, data: str | None = None,
                 options: ClassifyEvalOptions | None = None) -> dict[str, float]:
        """Loss, accuracy, macro F1 and per-class P/R/F1 on the validation split or on `data`.
        `rnnkit eval` passes options and so, by default, writes confusion.txt and confusion.png; the
        trainer's evaluations pass none and only compute the metrics (drawing a figure at every
        evaluation would slow training for a picture nobody asked for)."""
        skipped = 0
        config = self.config
        if options is not None and options.skip_bad_rows is not None:
            config = dataclasses.replace(config, skip_bad_rows=options.skip_bad_rows)
        if data is None:
            if self._val is None:
                self._load_training_data()
            split, source = self._val, "validation split"
            if len(split.y) == 0:
                split, source = self._train, "training rows (--val-fraction 0)"
        else:
            path = Path(data)
            if path.is_dir():
                files = data_files(str(path))
                if files.test is None:
                    raise UsageError(f"{path} has no test.csv to evaluate on; give a CSV file instead")
                path = files.test
            split, rows = to_split(read_rows(path, config.skip_bad_rows), self.names, path, config)
            skipped, source = rows.skipped, str(path)
        logits = self.logits(model, split.x, split.lengths)
        loss = float(F.cross_entropy(logits, split.y, reduction="mean"))
        confusion = confusion_matrix(split.y, logits.argmax(1), len(self.names))
        metrics = {"loss": loss, **class_metrics(confusion, self.names)}
        if data is not None:
            metrics["rows"] = float(len(split.y))
            metrics["skipped_rows"] = float(skipped)
        if options is not None and options.confusion:
            title = f"{source}: accuracy {metrics['accuracy']:.4f} on {len(split.y)} rows"
            atomic_write_text(self.run_dir / "confusion.txt", title + "\n" + confusion_text(confusion, self.names))
            plot_confusion(confusion, self.names, self.run_dir / "confusion.png", title)
        return metrics

    def logits(self, model: nn.Module, x: Tensor, lengths: Tensor) -> Tensor:
        """Logits (N, K) on CPU, in batches of --eval-batch-size, rows sorted by length for less padding."""
        device = device_of(model)
        order = lengths.argsort(descending=True)
        out = torch.empty(len(lengths), len(self.names))
        with torch.no_grad():
            for start in range(0, len(order), self.config.eval_batch_size):
                rows = order[start: start + self.config.eval_batch_size]
                batch = move_to(self._batch(Split(x, lengths, lengths), rows), device)
                out[rows] = model(batch.x, batch.lengths)[0].float().cpu()
        return out

    def predict(self, model: nn.Module, texts: list[str]) -> Tensor:
        """Class probabilities (N, K) of each text (empty texts must be refused by the caller)."""
        x, lengths = encode([t.encode("utf-8") for t in texts], self.config.seq_len)
        return self.logits(model, x, lengths).softmax(dim=1)
