"""The classify task the trainer drives: its config (`rnnkit train classify` flags), the shuffled
epochs of training rows, the loss, evaluation with per-class metrics, and prediction on texts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write, atomic_write_text
from rnnkit.tasks.base import Task, device_of, move_to, option, shard_range, step_generator
from rnnkit.tasks.cell_spec import cell_option, resolve_cell
from rnnkit.tasks.classify.data import (
    Rows,
    Split,
    class_names_for,
    data_files,
    encode,
    in_validation,
    read_rows,
    to_split,
)
from rnnkit.tasks.classify.metrics import class_metrics, confusion_matrix, confusion_text, plot_confusion
from rnnkit.tasks.classify.model import ByteClassifier
from rnnkit.tasks.regularisers import RegulariserOptions

LABELS_FILE = "labels.json"  # artifact in the run directory: the class names, in index order


@dataclass(frozen=True)
class ClassifyConfig(RegulariserOptions):
    data: str | None = option(
        None,
        "folder with train.csv (+ test.csv, classes.txt) or one CSV of "
        "label,text rows (default: AG News, downloaded once into the cache)",
    )
    seq_len: int = option(256, "bytes of each text the model reads; longer texts are cut")
    val_fraction: float = option(0.05, "fraction of training rows held out for validation (by text hash)")
    skip_bad_rows: bool = option(False, "skip malformed CSV rows and report how many, instead of stopping")
    # Model defaults: the most accurate per CPU minute on AG News (docs/tasks/classify.md, "Results")
    input: Literal["onehot", "embedding"] = option(
        "embedding", "byte input: one-hot of depth 256 or a learned embedding"
    )
    embed: int = option(64, "size of the learned byte embedding (--input embedding)")
    ngrams: int = option(
        4, "also add hashed embeddings of the 2..N bytes ending at each byte (1 = off; needs --input embedding)"
    )
    words: bool = option(
        True,
        "also add a hashed embedding of the word so far at each byte (the letters "
        "and digits since the last other byte, at most 20; needs --input embedding)",
    )
    word_pairs: bool = option(
        False, "also add a hashed embedding of (previous word, word so far) at each byte of a word (needs --words)"
    )
    buckets: int = option(65536, "hash buckets shared by the n-gram and word embeddings")
    bag: bool = option(
        True,
        "also train a bag-of-words model (the text's hashed words and word pairs, as fastText) on its own "
        "loss beside the recurrent one; the prediction adds the two models' log-probabilities",
    )
    bag_buckets: int = option(1 << 18, "hash buckets of the --bag model's words and word pairs")
    patch: int = option(8, "bytes per RNN step: their input vectors are concatenated (1 = one byte per step)")
    cell: str = cell_option(
        "gru", "recurrent cell: a built-in name, or MODULE:CLASS for a GatedCell subclass of your own"
    )
    hidden: int = option(128, "hidden size per direction")
    layers: int = option(1, "stacked bidirectional layers")
    pooling: Literal["ends", "max", "mean"] = option(
        "mean",
        "what each direction contributes: ends = forward at the last byte and backward at the "
        "first; max / mean = over each text's valid steps",
    )
    e_dim: int = option(128, "each direction is projected to this size and the two are added")
    dropout: float = option(0.2, "dropout on the inputs, between layers and before the classifier")
    feature_dropout: float = option(
        0.6,
        "in training, drop each hashed n-gram and word embedding at each byte with this probability "
        "(the whole vector; the kept ones are scaled by 1/(1-p); nothing to drop without --ngrams > 1 or --words)",
    )
    batch_size: int = option(128, "texts per step, summed over all processes")
    max_epochs: float | None = option(
        8.0,
        "under a --time-budget without --steps, train at most this many passes over the training texts: "
        "the run ends, and the learning rate decays, at whichever comes first (none: the whole budget)",
    )
    eval_batch_size: int = option(512, "texts per forward pass in eval and predict", resumable=True)
    data_seed: int = option(0, "seed of the training order (the validation split never depends on it)")

    @staticmethod
    def upgrade_saved(values: dict) -> dict:
        """A config.json of an earlier version: the model settings it lacks take the defaults of
        then (one-hot bytes, 3 bidirectional LSTM layers of 512, ends pooling), so it loads its model."""
        then = {
            "input": "onehot",
            "ngrams": 1,
            "words": False,
            "patch": 1,
            "cell": "lstm",
            "hidden": 512,
            "layers": 3,
            "pooling": "ends",
            "dropout": 0.0,
            "feature_dropout": 0.0,
            "bag": False,
            "max_epochs": None,
        }
        return then | dict(values)

    def __post_init__(self):
        for name in (
            "seq_len",
            "embed",
            "buckets",
            "bag_buckets",
            "patch",
            "hidden",
            "layers",
            "e_dim",
            "batch_size",
            "eval_batch_size",
            "ngrams",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise UsageError(f"--max-epochs must be positive (or none), got {self.max_epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("dropout", "feature_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.word_pairs and not self.words:
            raise UsageError("--word-pairs needs --words")
        if (self.ngrams > 1 or self.words) and self.input == "onehot":
            raise UsageError(
                "--ngrams > 1 and --words need --input embedding (hashed n-grams are learned "
                "vectors); use --ngrams 1 --no-words with --input onehot"
            )
        # a cell of your own that cannot be imported fails here, in one line
        self.check_regularisers(resolve_cell(self.cell))


@dataclass(frozen=True)
class ClassifyEvalOptions:
    skip_bad_rows: bool | None = option(
        None, "skip malformed rows of --data and report how many (default: what the run was trained with)"
    )
    confusion: bool = option(True, "write the confusion matrix to RUN_DIR/confusion.txt and confusion.png")


class ClassifyTask(Task):
    name = "classify"
    Config = ClassifyConfig
    train_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-2, "warmup_steps": 20}
    # validation accuracy peaks early and the model then overfits: evaluate often (it is cheap), so
    # the best checkpoint is near the peak
    evals_per_budget = 40
    items_name = "samples"
    best_metric = "accuracy"
    higher_is_better = True
    EvalOptions = ClassifyEvalOptions  # extra `rnnkit eval` flags

    def __init__(self, config: ClassifyConfig, run_dir: Path, names: list[str]):
        super().__init__(config, run_dir)
        self.names = names  # class names, in index order
        self._train: Split | None = None  # loaded by create, or lazily for eval of the val split
        self._val: Split | None = None
        self._perm: tuple[int, Tensor] | None = None  # (epoch, permutation) cache for train_batch

    @classmethod
    def create(cls, config: ClassifyConfig, run_dir: Path) -> ClassifyTask:
        files = data_files(config.data)
        rows = read_rows(files.train, config.skip_bad_rows)
        task = cls(config, run_dir, class_names_for(rows, files.classes))
        task._split_training_rows(rows, files.train)
        return task

    def save_artifacts(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / LABELS_FILE, json.dumps({"labels": self.names}, indent=2) + "\n")

    @classmethod
    def from_run_dir(cls, config: ClassifyConfig, run_dir: Path) -> ClassifyTask:
        path = Path(run_dir) / LABELS_FILE
        try:
            names = json.loads(path.read_text(encoding="utf-8"))["labels"]
        except FileNotFoundError:
            raise UsageError(f"{path} is missing; the run directory is incomplete") from None
        except (ValueError, KeyError, TypeError):
            raise UsageError(f'{path} is damaged (expected {{"labels": [names...]}})') from None
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
            raise UsageError(
                f"{path}: no training rows left after holding out --val-fraction {self.config.val_fraction}"
            )

    # ---- model and data ----
    def build_model(self) -> nn.Module:
        return ByteClassifier(self.config, len(self.names))

    def _splits(self) -> tuple[Split, Split]:
        """The training and validation splits, read on first use."""
        if self._train is None or self._val is None:
            self._load_training_data()
        assert self._train is not None and self._val is not None  # _load_training_data set both
        return self._train, self._val

    def budget_steps(self) -> int | None:
        """--max-epochs passes over the training texts, in steps: the most a time budget is spent on."""
        if self.config.max_epochs is None:
            return None
        return max(1, math.ceil(self.config.max_epochs * len(self._splits()[0].y) / self.config.batch_size))

    def train_batch(self, step: int, rank: int, world_size: int) -> Split:
        train, _ = self._splits()
        N = len(train.y)
        B = self.config.batch_size
        positions = torch.tensor([step * B + i for i in shard_range(B, rank, world_size)])
        epochs, offsets = positions // N, positions % N
        rows = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            chosen = epochs == epoch
            rows[chosen] = self._permutation(epoch)[offsets[chosen]]
        return self._batch(train, rows)

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = step_generator(self.config.data_seed, epoch, 0, stream="classify-epoch")
            self._perm = (epoch, torch.randperm(len(self._splits()[0].y), generator=g))
        return self._perm[1]

    @staticmethod
    def _batch(split: Split, rows: Tensor) -> Split:
        lengths = split.lengths[rows]
        return Split(split.x[rows, : int(lengths.max())], lengths, split.y[rows])

    def loss(self, model: nn.Module, batch: Split) -> tuple[Tensor, int]:
        _, loss = model(batch.x, batch.lengths, batch.y)
        return loss, len(batch.y)

    # ---- evaluation ----
    def evaluate(
        self, model: nn.Module, data: str | None = None, options: ClassifyEvalOptions | None = None
    ) -> dict[str, float]:
        """Loss, accuracy, macro F1 and per-class P/R/F1 on the validation split or on `data`.
        `rnnkit eval` passes options and so, by default, writes confusion.txt and confusion.png; the
        trainer's evaluations pass none and only compute the metrics (drawing a figure at every
        evaluation would slow training for a picture nobody asked for)."""
        skipped = 0
        config = self.config
        if options is not None and options.skip_bad_rows is not None:
            config = dataclasses.replace(config, skip_bad_rows=options.skip_bad_rows)
        if data is None:
            train, val = self._splits()
            split, source = val, "validation split"
            if len(split.y) == 0:
                split, source = train, "training rows (--val-fraction 0)"
        else:
            path = Path(data)
            if path.is_dir():
                files = data_files(str(path))
                if files.test is None:
                    raise UsageError(f"{path} has no test.csv to evaluate on; give a CSV file instead")
                path = files.test
            split, rows = to_split(read_rows(path, config.skip_bad_rows), self.names, path, config)
            skipped, source = rows.skipped, str(path)
        each = options is not None and getattr(model, "bag", None) is not None  # also score the two models alone
        if each:
            recurrent, bag = self.logits(model, split.x, split.lengths, parts=True)
            logits = ByteClassifier.combine(recurrent, bag)
        else:
            logits = self.logits(model, split.x, split.lengths)
        loss = float(F.cross_entropy(logits, split.y, reduction="mean"))
        confusion = confusion_matrix(split.y, logits.argmax(1), len(self.names))
        metrics = {"loss": loss, **class_metrics(confusion, self.names)}
        if data is not None:
            metrics["rows"] = float(len(split.y))
            metrics["skipped_rows"] = float(skipped)
        if each:
            metrics["recurrent_accuracy"] = float((recurrent.argmax(1) == split.y).float().mean())
            metrics["bag_accuracy"] = float((bag.argmax(1) == split.y).float().mean())
        if options is not None and options.confusion:
            title = f"{source}: accuracy {metrics['accuracy']:.4f} on {len(split.y)} rows"
            atomic_write_text(self.run_dir / "confusion.txt", title + "\n" + confusion_text(confusion, self.names))
            plot_confusion(confusion, self.names, self.run_dir / "confusion.png", title)
        return metrics

    def logits(self, model: nn.Module, x: Tensor, lengths: Tensor, parts: bool = False) -> Tensor:
        """Logits (N, K) on CPU, in batches of --eval-batch-size, rows sorted by length for less padding;
        with `parts`, the recurrent model's and the bag-of-words model's (2, N, K) (ByteClassifier.parts)."""
        device = device_of(model)
        order = lengths.argsort(descending=True)
        out = torch.empty(2 if parts else 1, len(lengths), len(self.names))
        with torch.no_grad():
            for start in range(0, len(order), self.config.eval_batch_size):
                rows = order[start : start + self.config.eval_batch_size]
                batch = move_to(self._batch(Split(x, lengths, lengths), rows), device)
                if parts:  # only asked of a model with --bag (evaluate checks), so both are tensors
                    pieces = [p for p in cast(ByteClassifier, model).parts(batch.x, batch.lengths) if p is not None]
                else:
                    pieces = [model(batch.x, batch.lengths)[0]]
                for i, piece in enumerate(pieces):
                    out[i, rows] = piece.float().cpu()
        return out if parts else out[0]

    @classmethod
    def write_data(cls, data: Any, directory: Path) -> str:
        """In-memory examples: (texts, labels), two lists of the same length, or a list of (label, text)."""
        if (
            isinstance(data, tuple)
            and len(data) == 2
            and len(data[0]) == len(data[1])
            and data[0]
            and all(isinstance(t, str) for t in data[0])
        ):
            pairs = list(zip(data[1], data[0]))
        elif (
            isinstance(data, (list, tuple)) and data and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in data)
        ):
            pairs = [(label, text) for label, text in data]
        else:
            raise UsageError("a classifier's data= is a path, (texts, labels) or a list of (label, text) pairs")
        path = Path(directory) / "train.csv"
        rows = io.StringIO()
        csv.writer(rows, lineterminator="\n").writerows([str(label), text] for label, text in pairs)
        atomic_write(path, lambda tmp: Path(tmp).write_text(rows.getvalue(), encoding="utf-8"))
        return str(path)

    def predict(self, model: nn.Module, texts: list[str]) -> Tensor:
        """Class probabilities (N, K) of each text (empty texts must be refused by the caller)."""
        x, lengths = encode([t.encode("utf-8") for t in texts], self.config.seq_len)
        return self.logits(model, x, lengths).softmax(dim=1)
