"""The lm task the trainer drives: its config (`rnnkit train lm` flags), batches from the stateful or
random windows, the loss with the carried state, and evaluation in bits per character.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnkit.common.errors import UsageError
from rnnkit.common.files import atomic_write, atomic_write_text
from rnnkit.tasks.base import Task, device_of, option, shard_range, step_generator
from rnnkit.tasks.cell_spec import cell_option, resolve_cell
from rnnkit.tasks.lm.data import Vocab, read_corpus, split_test
from rnnkit.tasks.lm.generate import generate
from rnnkit.tasks.lm.model import CharRNN, detach_state, state_from_dict, state_to_dict
from rnnkit.tasks.regularisers import RegulariserOptions

VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class LMConfig(RegulariserOptions):
    data: str | None = option(
        None,
        "UTF-8 text file or folder, or a dataset name (tinyshakespeare) "
        "(default: the Python standard library's source code)",
    )
    bytes: bool = option(False, "model raw bytes (vocabulary of 256) instead of characters; reads any file")
    corpus_bytes: int = option(3_000_000, "size cap of the default standard-library corpus, in bytes")
    val_fraction: float = option(0.1, "the last fraction of the text used for validation (nanoGPT's 0.1)")
    test_fraction: float = option(
        0.0,
        "the last fraction of the text held out as test text, after the validation text: never trained on "
        "nor validated on; `rnnkit eval RUN_DIR --split test` scores it (0.1 and --val-fraction 0.1: an "
        "80/10/10 split)",
    )
    # Model and batch defaults: the best of short tiny-shakespeare runs for a 10-minute CPU budget
    # (GRU learns faster per second than LSTM there; more, smaller steps beat fewer, larger ones;
    # a little dropout, because a 2 x 256 GRU overfits that text within ten minutes of a quiet CPU).
    cell: str = cell_option(
        "gru", "recurrent cell: a built-in name, or MODULE:CLASS for a GatedCell subclass of your own"
    )
    layers: int = option(2, "stacked recurrent layers")
    hidden: int = option(256, "hidden size of each layer")
    embed: int = option(64, "character embedding size; 0 = one-hot input of depth V (the vocabulary size)")
    dropout: float = option(0.1, "dropout between layers and before the output projection (helps long runs)")
    seq_len: int = option(32, "characters per row per step (truncated-BPTT length; the state carries on)")
    batch_size: int = option(64, "rows per step, summed over all processes")
    windows: Literal["stateful", "random"] = option(
        "stateful",
        "stateful: each row reads on where it "
        "stopped and carries the state; random: fresh random "
        "windows from a zero state",
    )
    eval_chars: int | None = option(
        None, "evaluate on at most this many validation characters (default: all)", resumable=True
    )
    eval_batch_size: int = option(64, "validation rows run in parallel", resumable=True)
    sample_chars: int = option(200, "length of the sample printed at each evaluation (0 = no sample)", resumable=True)
    data_seed: int = option(0, "seed of the random windows and of each epoch's starting offset")

    @staticmethod
    def upgrade_saved(values: dict) -> dict:
        """A config.json of an earlier version: `dropout`, if absent, is 0 (its default then)."""
        return {"dropout": 0.0} | dict(values)

    def __post_init__(self):
        for name in ("layers", "hidden", "seq_len", "batch_size", "eval_batch_size", "corpus_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("embed", "sample_chars"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.eval_chars is not None and self.eval_chars < 2:
            raise UsageError(f"--eval-chars must be at least 2, got {self.eval_chars}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not (0.0 <= self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0):
            raise UsageError(
                f"--test-fraction must be in [0, 1) and leave training text beside --val-fraction "
                f"{self.val_fraction:g}, got {self.test_fraction}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        # a cell of your own that cannot be imported fails here, in one line
        self.check_regularisers(resolve_cell(self.cell))


@dataclass(frozen=True)
class LMEvalOptions:
    split: Literal["val", "test"] = option(
        "val", "which held-out text to score: the validation text, or the --test-fraction test text"
    )
    window: int | None = option(
        None,
        "score random windows of this many characters, each from a zero state, as transformers are "
        "scored (default: the whole text in order, the state carried, as the network reads it)",
    )
    window_count: int = option(2000, "how many random windows --window scores (drawn with a fixed seed)")

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise UsageError(f"--window must be at least 1, got {self.window}")
        if self.window_count < 1:
            raise UsageError(f"--window-count must be at least 1, got {self.window_count}")


class LMBatch(NamedTuple):
    x: Tensor  # (b, T) input ids, this process's rows
    y: Tensor  # (b, T) next ids
    reset: bool  # start from a zero state (first chunk of an epoch, or random windows)


class LMTask(Task):
    name = "lm"
    Config = LMConfig
    EvalOptions = LMEvalOptions
    items_name = "chars"
    # tuned on tiny shakespeare on a 2-core CPU (docs/tasks/lm.md); under a --time-budget without
    # --steps the schedule spans the budget instead of the 2,100 steps
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 2100, "lr": 2e-3, "warmup_steps": 30}

    def __init__(self, config: LMConfig, run_dir: Path, vocab: Vocab, corpus_sha256: str | None = None):
        super().__init__(config, run_dir)
        self.vocab = vocab
        self.corpus_sha256 = corpus_sha256
        self._train: Tensor | None = None  # (N,) token ids, read on first use
        self._val: Tensor | None = None
        self._test: Tensor | None = None
        self.state: Any = None  # carried state of this process's rows (stateful windows)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: LMConfig, run_dir: Path) -> LMTask:
        corpus = read_corpus(config)
        vocab = Vocab.of_bytes() if isinstance(corpus, bytes) else Vocab.from_text(corpus)  # bytes iff --bytes
        task = cls(config, run_dir, vocab, _sha256(corpus))
        task._set_corpus(corpus)
        return task

    def save_artifacts(self, run_dir: Path) -> None:
        doc = self.vocab.to_json() | {"corpus_sha256": self.corpus_sha256}
        atomic_write_text(Path(run_dir) / VOCAB_FILE, json.dumps(doc, ensure_ascii=True) + "\n")

    @classmethod
    def from_run_dir(cls, config: LMConfig, run_dir: Path) -> LMTask:
        path = Path(run_dir) / VOCAB_FILE
        doc = Vocab.read_json(path)
        return cls(config, run_dir, Vocab.from_json(doc, str(path)), doc.get("corpus_sha256"))

    def _set_corpus(self, corpus: str | bytes) -> None:
        c = self.config
        train, val, test = split_test(corpus, c.val_fraction, c.test_fraction)
        if len(val) < 2:  # validation predicts each token from the ones before it: it needs two
            unit = "bytes" if c.bytes else "characters"
            raise UsageError(
                f"--data {c.data or '(standard library)'}: the validation text (the last "
                f"--val-fraction {c.val_fraction:g} of {len(corpus)} {unit}) is {len(val)} {unit}; "
                f"it needs at least 2: use a longer text or a larger --val-fraction"
            )
        self._train = self.vocab.encode_tensor(train, "the training text")
        self._val = self.vocab.encode_tensor(val, "the validation text")
        self._test = self.vocab.encode_tensor(test, "the test text") if test else None

    @classmethod
    def write_data(cls, data: Any, directory: Path) -> str:
        """In-memory text: bytes, or a list of strings (documents, joined by blank lines)."""
        if isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data):
            data = "\n\n".join(data).encode("utf-8")
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise UsageError(
                "a language model's data= is a path, bytes, or a list of strings (documents); "
                f"got {type(data).__name__}{' (empty)' if not data else ''}"
            )
        path = Path(directory) / "text.txt"
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(bytes(data)))
        return str(path)

    def _ensure_corpus(self) -> None:
        """Read the corpus after `from_run_dir` (resume, eval), checking it is the run's text."""
        if self._train is not None:
            return
        corpus = read_corpus(self.config)
        if self.corpus_sha256 and _sha256(corpus) != self.corpus_sha256:
            raise UsageError(
                f"the text of --data {self.config.data or '(standard library)'} changed since "
                f"this run was created (sha256 differs); its data order cannot be resumed"
            )
        self._set_corpus(corpus)

    # -- model and data ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return CharRNN(len(self.vocab), self.config)

    def _ids(self, which: str) -> Tensor:
        """The training, validation ("val") or test token ids, reading the corpus on first use."""
        self._ensure_corpus()
        ids = {"train": self._train, "val": self._val, "test": self._test}[which]
        if ids is None:
            raise UsageError("this run holds no test text: train with --test-fraction to keep one")
        return ids

    def _layout(self) -> tuple[int, int]:
        """(row length, steps per epoch) of the stateful stream."""
        c, n = self.config, len(self._ids("train"))
        row = n // c.batch_size
        steps = (row - 1 - (c.seq_len - 1)) // c.seq_len  # room for a [0, T) offset and the last target
        if steps < 1:
            raise UsageError(
                f"the training text ({n} tokens) is too short for --batch-size {c.batch_size} x "
                f"--seq-len {c.seq_len}: each row needs at least {2 * c.seq_len + 1} tokens; "
                f"use a smaller --batch-size or --seq-len"
            )
        return row, steps

    def train_batch(self, step: int, rank: int, world_size: int) -> LMBatch:
        train = self._ids("train")
        c = self.config
        rows = shard_range(c.batch_size, rank, world_size)
        T = c.seq_len
        if c.windows == "random":
            n = len(train)
            if n < T + 1:
                raise UsageError(f"the training text ({n} tokens) is shorter than --seq-len {c.seq_len} + 1")
            starts = torch.randint(0, n - T, (c.batch_size,), generator=step_generator(c.data_seed, step))
            starts, reset = starts[rows.start : rows.stop], True
        else:
            row_len, per_epoch = self._layout()
            epoch, k = divmod(step, per_epoch)
            offset = int(torch.randint(0, T, (1,), generator=step_generator(c.data_seed, epoch, stream="offset")))
            starts = torch.arange(rows.start, rows.stop) * row_len + offset + k * T
            reset = k == 0
        chunk = train[starts[:, None] + torch.arange(T + 1)]  # (b, T+1)
        return LMBatch(chunk[:, :-1], chunk[:, 1:], reset)

    def loss(self, model: nn.Module, batch: LMBatch) -> tuple[Tensor, int]:
        state = None if batch.reset else self.state
        if state is not None:
            state = _to_device(state, batch.x.device)
            if _batch_size_of(state) != batch.x.shape[0]:
                state = None
        out = model(batch.x, batch.y, state)
        self.state = detach_state(out.state) if self.config.windows == "stateful" else None
        return out.loss, batch.y.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: str | None = None, options: Any = None) -> dict[str, float]:
        options = options or LMEvalOptions()
        if data is None:
            ids = self._ids(options.split)
        else:
            corpus = read_corpus(LMConfig(data=data, bytes=self.config.bytes))
            ids = self.vocab.encode_tensor(corpus, source=data)
        if self.config.eval_chars is not None:
            ids = ids[: self.config.eval_chars]
        if options.window is not None:
            nats = window_loss(model, ids, options.window, options.window_count, self.config.eval_batch_size)
            return {"loss": nats, "bpc": nats / math.log(2), "window": float(options.window)}
        nats = stream_loss(model, ids, self.config.eval_batch_size, self.config.seq_len * 2)
        return {"loss": nats, "bpc": nats / math.log(2)}

    def on_eval(self, model: nn.Module, step: int) -> str | None:
        if not self.config.sample_chars:
            return None
        text = "".join(generate(model, self.vocab, "", self.config.sample_chars, temperature=0.8, seed=0))
        return f"sample at step {step}:\n{text}"

    # -- carried state (checkpointed) -------------------------------------------------------------
    def tensor_state(self) -> dict[str, Tensor]:
        return {} if self.state is None else state_to_dict(self.state)

    def load_tensor_state(self, state: dict[str, Tensor]) -> None:
        self.state = state_from_dict(state, self.config.cell) if state else None


def stream_loss(model: nn.Module, ids: Tensor, rows: int, chunk: int) -> float:
    """Mean next-token loss (nats) over `ids`, read as `rows` contiguous rows in chunks of `chunk`
    steps with the state carried, so every prediction sees all the text before it in its row."""
    n = len(ids)
    if n < 2:
        raise UsageError(f"cannot evaluate on {n} token(s): a loss needs at least 2 (one input, one target)")
    rows = max(1, min(rows, (n - 1) // 2))
    row_len = (n - 1) // rows  # inputs per row; the targets are shifted by one
    device = device_of(model)
    x_all = ids[: rows * row_len].view(rows, row_len)
    y_all = ids[1 : rows * row_len + 1].view(rows, row_len)
    total, state = 0.0, None
    for t in range(0, row_len, chunk):
        x = x_all[:, t : t + chunk].to(device)
        y = y_all[:, t : t + chunk].to(device)
        out = model(x, None, state)
        state = out.state
        total += float(
            F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
        )
    return total / (rows * row_len)


@torch.no_grad()
def window_loss(model: nn.Module, ids: Tensor, window: int, count: int, rows: int, seed: int = 0) -> float:
    """Mean next-token loss (nats) over `count` random windows of `window` tokens of `ids`, each read
    from a zero state (nanoGPT's estimate: every position predicts from the window's text before it).
    The windows are drawn from `seed`, so every model is scored on the same ones."""
    if len(ids) < window + 1:
        raise UsageError(f"cannot score windows of {window} on a text of {len(ids)} token(s)")
    starts = torch.randint(0, len(ids) - window, (count,), generator=torch.Generator().manual_seed(seed))
    device, total = device_of(model), 0.0
    for i in range(0, count, rows):
        chunk = ids[starts[i : i + rows, None] + torch.arange(window + 1)].to(device)  # (b, window + 1)
        out = model(chunk[:, :-1], None, None)
        logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
        total += float(F.cross_entropy(logits, chunk[:, 1:].reshape(-1), reduction="sum"))
    return total / (count * window)


def _sha256(corpus: str | bytes) -> str:
    return hashlib.sha256(corpus.encode("utf-8") if isinstance(corpus, str) else corpus).hexdigest()


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, Tensor):
        return state.to(device)
    return type(state)(*(s.to(device) for s in state))


def _batch_size_of(state: Any) -> int:
    return (state if isinstance(state, Tensor) else state[0]).shape[1]
