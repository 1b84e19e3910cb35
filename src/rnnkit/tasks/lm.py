"""The lm task (many-to-many): a character language model trained on any text, and sampling from it.

The seed deck's many-to-many example is the starting point: characters, one-hot, through a 3-layer
RNN of 512 that is fed an initial state, projected to the vocabulary, trained to predict the next
character; `generate_text` samples one character, feeds it and the carried state back in, repeats.

    rnnkit train lm --data input.txt            any UTF-8 file or folder; --bytes for raw bytes
    rnnkit train lm --data tinyshakespeare      downloaded once into the cache, sha256-checked
    rnnkit train lm                             the Python standard library's source (offline)
    rnnkit generate RUN_DIR --prompt "ROMEO:" --temperature 0.8

Data. The corpus is one text: a file, the files of a folder (recursively, sorted by path, joined as
they are), a named download (`DATASETS`), or, with no `--data`, the `*.py` source of the running
interpreter's standard library (files ordered by the sha256 of their path, the first
`--corpus-bytes` bytes' worth). The vocabulary is every distinct character of the corpus (or the
256 byte values with `--bytes`) and is saved as RUN_DIR/vocab.json. The last `--val-fraction` (10%) of
the text is validation, the first 90% training: nanoGPT's shakespeare_char split, so losses compare.

Model (x: (B, T) token ids; V vocabulary size; E = --embed, 0 = the seed's one-hot of depth V):

    e = Embed(x) or onehot(x)                   (B, T, E)
    o, state = RNN_{cell, layers, hidden}(e, state)    (B, T, H), dropout between layers
    logits = W dropout(o) + b                   (B, T, V)
    loss = mean_t CE(logits_t, x_{t+1})         nats per character; bits = nats / ln 2

`model(x, targets=None, state=None)` returns `LMOutput(logits, loss, state)`: loss is None without
targets, and `state` is always the final recurrent state, so a caller can carry it on.

Training (`--windows stateful`, the seed's fed initial state): the training text is cut into B equal
rows, each row read left to right in chunks of T = --seq-len; the detached final state of one step is
the initial state of the next (truncated backpropagation through time), so the model sees contexts
far longer than T. Each pass over the rows starts at a per-epoch offset in [0, T) and from a zero
state. `--windows random` draws B independent windows per step from a zero state instead. Validation
runs the whole validation text the same stateful way and reports the mean loss per character.

Generation runs the prompt once, then one step per character with the carried state: O(length).

>>> vocab = Vocab.from_text("hello world")
>>> model = CharRNN(len(vocab), LMConfig(hidden=16, layers=1, embed=8))
>>> out = model(torch.tensor([vocab.encode("hello")]))
>>> tuple(out.logits.shape), out.loss
((1, 5, 8), None)
>>> len("".join(generate(model, vocab, prompt="he", length=10, seed=0)))
10
"""
from __future__ import annotations

import codecs
import hashlib
import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import rnnkit
from rnnkit.tasks.base import Task, UsageError, device_of, option, shard_range, step_generator
from rnnkit.tasks.files import atomic_write_text, cache_dir, fetch

VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class LMConfig:
    data: str | None = option(None, "UTF-8 text file or folder, or a dataset name (tinyshakespeare); "
                                    "default: the Python standard library's source code")
    bytes: bool = option(False, "model raw bytes (vocabulary of 256) instead of characters; reads any file")
    corpus_bytes: int = option(3_000_000, "size cap of the default standard-library corpus, in bytes")
    val_fraction: float = option(0.1, "the last fraction of the text used for validation (nanoGPT's 0.1)")
    # Model and batch defaults: the best of short tiny-shakespeare runs for a 10-minute CPU budget
    # (GRU learns faster per second than LSTM there; more, smaller steps beat fewer, larger ones).
    cell: Literal["lstm", "gru", "rnn"] = option("gru", "recurrent cell (the seed's is lstm)")
    layers: int = option(2, "stacked recurrent layers (the seed has 3)")
    hidden: int = option(256, "hidden size of each layer (the seed's STATE_DIM is 512)")
    embed: int = option(64, "character embedding size; 0 = the seed's one-hot input of depth V")
    dropout: float = option(0.0, "dropout between layers and before the output projection (helps long runs)")
    seq_len: int = option(32, "characters per row per step (truncated-BPTT length; the state carries on)")
    batch_size: int = option(64, "rows per step, summed over all processes")
    windows: Literal["stateful", "random"] = option("stateful", "stateful: each row reads on where it "
                                                    "stopped and carries the state; random: fresh random "
                                                    "windows from a zero state")
    eval_chars: int | None = option(None, "evaluate on at most this many validation characters "
                                           "(default: all)", resumable=True)
    eval_batch_size: int = option(64, "validation rows run in parallel", resumable=True)
    sample_chars: int = option(200, "length of the sample printed at each evaluation (0 = none)",
                               resumable=True)
    data_seed: int = option(0, "seed of the random windows and of each epoch's starting offset")

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
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")


# ---- vocabulary -------------------------------------------------------------------------------------
class Vocab:
    """Characters (or the 256 byte values) <-> token ids. Id order is sorted character order."""

    def __init__(self, tokens: list[str] | None):
        # tokens=None: byte vocabulary, id = byte value
        self.is_bytes = tokens is None
        self.tokens = tokens
        self.index = {} if tokens is None else {c: i for i, c in enumerate(tokens)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    @classmethod
    def of_bytes(cls) -> "Vocab":
        return cls(None)

    def __len__(self) -> int:
        return 256 if self.is_bytes else len(self.tokens)

    def encode(self, text: str | bytes, source: str = "text") -> list[int]:
        """Token ids of `text`; a character outside the vocabulary is a UsageError naming it."""
        return self.encode_tensor(text, source).tolist()

    def encode_tensor(self, text: str | bytes, source: str = "text") -> Tensor:
        """Token ids of `text` as a (N,) int64 tensor (vectorised: corpora are megabytes)."""
        if self.is_bytes:
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
            raise UsageError(f"{source} has the character {c!r} (U+{ord(c):04X}), which is not in the model's "
                             f"vocabulary of {len(self)} characters")
        return ids

    def decoder(self) -> "Decoder":
        """A streaming decoder: ids in, text out (bytes are joined into UTF-8 characters as they complete)."""
        return Decoder(self)

    def decode(self, ids: list[int]) -> str:
        d = self.decoder()
        return d(ids) + d.flush()

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bytes"} if self.is_bytes else {"kind": "chars", "chars": self.tokens}

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str) -> "Vocab":
        if doc.get("kind") == "bytes":
            return cls.of_bytes()
        chars = doc.get("chars")
        if doc.get("kind") != "chars" or not isinstance(chars, list) or not all(
                isinstance(c, str) and len(c) == 1 for c in chars):
            raise UsageError(f"{source} is damaged (expected {{\"kind\": \"chars\", \"chars\": [...]}})")
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
    def load(cls, path: Path) -> "Vocab":
        return cls.from_json(cls.read_json(path), str(path))


class Decoder:
    """Ids -> text, one call per step. Byte vocabularies may need several bytes for one character."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if vocab.is_bytes else None

    def __call__(self, ids: list[int]) -> str:
        if self.utf8 is not None:
            return self.utf8.decode(bytes(ids))
        return "".join(self.vocab.tokens[i] for i in ids)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True) if self.utf8 is not None else ""


# ---- corpus -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteText:
    url: str        # where to download the file from
    sha256: str     # the published hash; a download that does not match is refused
    filename: str   # name of the file in the cache directory


DATASETS: dict[str, RemoteText] = {
    "tinyshakespeare": RemoteText(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "tinyshakespeare.txt"),
}


def download(name: str) -> Path:
    """The cached file of dataset `name`, downloaded and checksum-verified on first use."""
    remote = DATASETS[name]
    return fetch(remote.url, cache_dir() / remote.filename, "sha256", remote.sha256, name=name)


# tests and installed packages are not the standard library; `encodings` is mostly generated codec
# tables (hex literals), which would teach the model tables instead of Python
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def stdlib_corpus(max_bytes: int) -> str:
    """The running interpreter's standard-library source: *.py files (tests, site-packages and codec
    tables left out) ordered by the sha256 of their relative path, each file taken whole while the total stays within
    `max_bytes`. The same text on every run of the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
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
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UsageError(f"--data {path}: the folder has no files")
        return files
    raise UsageError(f"--data {path}: no such file or folder (or use a dataset name: {', '.join(DATASETS)})")


def read_corpus(config: LMConfig) -> str | bytes:
    """The whole corpus: str of characters, or bytes with --bytes."""
    if config.data is None:
        text = stdlib_corpus(config.corpus_bytes)
        return text.encode("utf-8") if config.bytes else text
    path = download(config.data) if config.data in DATASETS and not Path(config.data).exists() else Path(config.data)
    chunks = []
    for file in _text_files(path):
        raw = file.read_bytes()
        if config.bytes:
            chunks.append(raw)
            continue
        try:
            chunks.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{file} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                             f"convert it, or train on raw bytes with --bytes") from None
    corpus = (b"" if config.bytes else "").join(chunks)
    if len(corpus) < 2:
        raise UsageError(f"--data {path}: the text is empty")
    return corpus


def split(corpus: str | bytes, val_fraction: float) -> tuple[str | bytes, str | bytes]:
    """(train, val): the first 1 - val_fraction of the text and the rest (nanoGPT's split)."""
    n = int(len(corpus) * (1.0 - val_fraction))
    return corpus[:n], corpus[n:]


# ---- model ------------------------------------------------------------------------------------------
class LMOutput(NamedTuple):
    logits: Tensor        # (B, T, V) next-token scores
    loss: Tensor | None   # mean cross-entropy in nats, None without targets
    state: Any            # final recurrent state in the layer's layout (LSTMState(h, c) or h)


class CharRNN(nn.Module):
    """Embedding (or one-hot) -> multi-layer RNN -> dropout -> linear to the vocabulary."""

    def __init__(self, vocab_size: int, config: LMConfig):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, config.embed) if config.embed else None
        self.rnn = rnnkit.LAYERS[config.cell](config.embed or vocab_size, config.hidden, config.layers,
                                              dropout=config.dropout if config.layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, vocab_size)

    def forward(self, idx: Tensor, targets: Tensor | None = None, state: Any = None) -> LMOutput:
        if self.embed is not None:
            x = self.embed(idx)  # (B, T, E)
        else:
            x = F.one_hot(idx, self.vocab_size).to(self.head.weight.dtype)  # (B, T, V)
        out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.vocab_size).float(), targets.reshape(-1))
        return LMOutput(logits, loss, state)


def detach_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(*(s.detach() for s in state))


def state_to_dict(state: Any) -> dict[str, Tensor]:
    if isinstance(state, Tensor):
        return {"h": state}
    return dict(zip(state._fields, state))


def state_from_dict(d: dict[str, Tensor], cell: str) -> Any:
    """Inverse of `state_to_dict` for a layer of `cell`: the cell's State NamedTuple (LSTMState(h, c)),
    or the bare h tensor the layers return for a one-part state."""
    State = rnnkit.CELLS[cell].State
    if State._fields == ("h",):
        return d["h"]
    return State(*(d[name] for name in State._fields))


# ---- generation -------------------------------------------------------------------------------------
class Sampler:
    """Carries K samples' state through a model: `feed` ids, read `probs`, `draw` the next ids.

    temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
    probability reaches p (nucleus). Randomness comes only from a torch.Generator seeded with `seed`.
    """

    def __init__(self, model: nn.Module, num_samples: int = 1, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        if temperature < 0 or not math.isfinite(temperature):
            raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
        if num_samples < 1:
            raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
        self.model, self.K = model, num_samples
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.device = device_of(model)
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.state = None
        self.logits: Tensor | None = None  # (K, V) scores for the next token

    @torch.no_grad()
    def feed(self, ids: Tensor) -> None:
        """Run ids (K, T) (or (T,) for all samples) from the carried state."""
        if ids.dim() == 1:
            ids = ids.expand(self.K, -1)
        out = self.model(ids.to(self.device), None, self.state)
        self.state, self.logits = out.state, out.logits[:, -1].float()  # (K, V)

    def probs(self) -> Tensor:
        """(K, V) distribution of the next token after temperature, top-k and top-p."""
        logits = self.logits
        if self.temperature == 0:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # mass before a token already reaches p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self) -> Tensor:
        """(K,) next ids, sampled from `probs` (argmax when temperature is 0)."""
        if self.temperature == 0:
            return self.logits.argmax(-1)
        return torch.multinomial(self.probs(), 1, generator=self.generator).squeeze(1)


def start_ids(vocab: Vocab, prompt: str) -> list[int]:
    """The ids the model reads before the first generated token: the prompt, or with an empty
    prompt a newline (the start of a line), or the first token of the vocabulary without one."""
    if prompt:
        return vocab.encode(prompt, source="the prompt")
    if vocab.is_bytes:
        return [10]
    return [vocab.index.get("\n", 0)]


def generate_batch(model: nn.Module, vocab: Vocab, prompt: str = "", length: int = 200,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, num_samples: int = 1) -> Iterator[tuple[str, ...]]:
    """Sample `num_samples` continuations of `prompt` as one batch; yields, per step, a tuple with each
    sample's new text (one character; with --bytes, possibly '' until a UTF-8 character completes).
    The prompt runs once; each step feeds one token with the carried state."""
    if length < 0:
        raise UsageError(f"--length must be >= 0, got {length}")
    ids = torch.tensor(start_ids(vocab, prompt), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        sampler = Sampler(model, num_samples, temperature, top_k, top_p, seed)
        sampler.feed(ids)
        decoders = [vocab.decoder() for _ in range(num_samples)]
        for i in range(length):
            nxt = sampler.draw()  # (K,)
            values = nxt.tolist()
            yield tuple(d([v]) for d, v in zip(decoders, values))
            if i + 1 < length:
                sampler.feed(nxt[:, None])
        tail = tuple(d.flush() for d in decoders)
        if any(tail):
            yield tail
    finally:
        model.train(was_training)


def generate(model: nn.Module, vocab: Vocab, prompt: str = "", length: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> Iterator[str]:
    """One sample, as an iterator of characters (see `generate_batch`)."""
    for (piece,) in generate_batch(model, vocab, prompt, length, temperature, top_k, top_p, seed, 1):
        if piece:
            yield piece


# ---- the task ---------------------------------------------------------------------------------------
class LMBatch(NamedTuple):
    x: Tensor      # (b, T) input ids, this process's rows
    y: Tensor      # (b, T) next ids
    reset: bool    # start from a zero state (first chunk of an epoch, or random windows)


class LMTask(Task):
    name = "lm"
    Config = LMConfig
    items_name = "chars"
    # tuned on tiny shakespeare with --time-budget 600 on a 2-core CPU (README, "Quality")
    train_defaults = {"steps": 2100, "lr": 6e-3, "warmup_steps": 30}

    def __init__(self, config: LMConfig, run_dir: Path, vocab: Vocab, corpus_sha256: str | None = None):
        super().__init__(config, run_dir)
        self.vocab = vocab
        self.corpus_sha256 = corpus_sha256
        self._train: Tensor | None = None  # (N,) token ids, read on first use
        self._val: Tensor | None = None
        self.state: Any = None  # carried state of this process's rows (stateful windows)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, config: LMConfig, run_dir: Path) -> "LMTask":
        corpus = read_corpus(config)
        vocab = Vocab.of_bytes() if config.bytes else Vocab.from_text(corpus)
        task = cls(config, run_dir, vocab, _sha256(corpus))
        task._set_corpus(corpus)
        return task

    def save_artifacts(self, run_dir: Path) -> None:
        doc = self.vocab.to_json() | {"corpus_sha256": self.corpus_sha256}
        atomic_write_text(Path(run_dir) / VOCAB_FILE, json.dumps(doc, ensure_ascii=True) + "\n")

    @classmethod
    def from_run_dir(cls, config: LMConfig, run_dir: Path) -> "LMTask":
        path = Path(run_dir) / VOCAB_FILE
        doc = Vocab.read_json(path)
        return cls(config, run_dir, Vocab.from_json(doc, str(path)), doc.get("corpus_sha256"))

    def _set_corpus(self, corpus: str | bytes) -> None:
        c = self.config
        train, val = split(corpus, c.val_fraction)
        if len(val) < 2:  # validation predicts each token from the ones before it: it needs two
            unit = "bytes" if c.bytes else "characters"
            raise UsageError(f"--data {c.data or '(standard library)'}: the validation text (the last "
                             f"--val-fraction {c.val_fraction:g} of {len(corpus)} {unit}) is {len(val)} {unit}; "
                             f"it needs at least 2: use a longer text or a larger --val-fraction")
        self._train = self.vocab.encode_tensor(train, "the training text")
        self._val = self.vocab.encode_tensor(val, "the validation text")

    def _ensure_corpus(self) -> None:
        """Read the corpus after `from_run_dir` (resume, eval), checking it is the run's text."""
        if self._train is not None:
            return
        corpus = read_corpus(self.config)
        if self.corpus_sha256 and _sha256(corpus) != self.corpus_sha256:
            raise UsageError(f"the text of --data {self.config.data or '(standard library)'} changed since "
                             f"this run was created (sha256 differs); its data order cannot be resumed")
        self._set_corpus(corpus)

    # -- model and data ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return CharRNN(len(self.vocab), self.config)

    def _layout(self) -> tuple[int, int]:
        """(row length, steps per epoch) of the stateful stream."""
        c, n = self.config, len(self._train)
        row = n // c.batch_size
        steps = (row - 1 - (c.seq_len - 1)) // c.seq_len  # room for a [0, T) offset and the last target
        if steps < 1:
            raise UsageError(f"the training text ({n} tokens) is too short for --batch-size {c.batch_size} x "
                             f"--seq-len {c.seq_len}: each row needs at least {2 * c.seq_len + 1} tokens; "
                             f"use a smaller --batch-size or --seq-len")
        return row, steps

    def train_batch(self, step: int, rank: int, world_size: int) -> LMBatch:
        self._ensure_corpus()
        c = self.config
        rows = shard_range(c.batch_size, rank, world_size)
        T = c.seq_len
        if c.windows == "random":
            n = len(self._train)
            if n < T + 1:
                raise UsageError(f"the training text ({n} tokens) is shorter than --seq-len {c.seq_len} + 1")
            starts = torch.randint(0, n - T, (c.batch_size,), generator=step_generator(c.data_seed, step))
            starts, reset = starts[rows.start:rows.stop], True
        else:
            row_len, per_epoch = self._layout()
            epoch, k = divmod(step, per_epoch)
            offset = int(torch.randint(0, T, (1,), generator=step_generator(c.data_seed, epoch, stream="offset")))
            starts = torch.arange(rows.start, rows.stop) * row_len + offset + k * T
            reset = k == 0
        chunk = self._train[starts[:, None] + torch.arange(T + 1)]  # (b, T+1)
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
    def evaluate(self, model: nn.Module, data: str | None = None) -> dict[str, float]:
        if data is None:
            self._ensure_corpus()
            ids = self._val
        else:
            corpus = read_corpus(LMConfig(data=data, bytes=self.config.bytes))
            ids = self.vocab.encode_tensor(corpus, source=data)
        if self.config.eval_chars is not None:
            ids = ids[:self.config.eval_chars]
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
    y_all = ids[1: rows * row_len + 1].view(rows, row_len)
    total, state = 0.0, None
    for t in range(0, row_len, chunk):
        x = x_all[:, t:t + chunk].to(device)
        y = y_all[:, t:t + chunk].to(device)
        out = model(x, None, state)
        state = out.state
        total += float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1),
                                       reduction="sum"))
    return total / (rows * row_len)


def _sha256(corpus: str | bytes) -> str:
    return hashlib.sha256(corpus.encode("utf-8") if isinstance(corpus, str) else corpus).hexdigest()


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, Tensor):
        return state.to(device)
    return type(state)(*(s.to(device) for s in state))


def _batch_size_of(state: Any) -> int:
    return (state if isinstance(state, Tensor) else state[0]).shape[1]
