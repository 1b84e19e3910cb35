"""The sort task (many-to-one-to-many): its config, batches, loss, metrics and text input/output.

    rnnkit train sort --min-len 2 --max-len 20 --decoder pointer     integers in [0, 128)
    rnnkit train sort --floats --min-len 5 --max-len 15              floats in [0, 1], "Order Matters"
    rnnkit eval RUN_DIR --lengths 5 10 20 50 [--beam 4] [--json]     accuracy per length, past training's too
    echo "3 1 2" | rnnkit predict RUN_DIR                            -> "1 2 3"

Metrics, for each N on the fixed held-out set of that N (data.test_set): `accuracy@N`, the fraction of
output elements equal to the sorted target at their position; `exact@N`, the fraction of sequences
sorted entirely right; `loss@N`, the teacher-forced cross-entropy per element (nats). `accuracy`,
`exact` and `loss` are their means over the evaluated N.

>>> from rnnkit.tasks.sort.task import SortConfig, parse_sequence
>>> parse_sequence("3, 1 2", SortConfig(vocab=10), where="line 1")
[3, 1, 2]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, cast

import torch
from torch import nn

from rnnkit.common.errors import UsageError
from rnnkit.tasks.base import Task, device_of, move_to, option, shard_range, step_generator
from rnnkit.tasks.cell_spec import cell_option, resolve_cell
from rnnkit.tasks.regularisers import GROUP, RegulariserOptions
from rnnkit.tasks.sort.data import SortBatch, draw_length, make_batch, sample, test_set
from rnnkit.tasks.sort.model import POINTS, SortModel
from rnnkit.tasks.sort.search import choose, decode


@dataclass(frozen=True)
class SortConfig(RegulariserOptions):
    min_len: int = option(2, "shortest training sequence (each step draws one length, uniformly)")
    max_len: int = option(20, "longest training sequence (equal to --min-len: every sequence has that length)")
    vocab: int = option(128, "integer tokens are drawn from [0, V)")
    int_value: bool = option(
        True,
        "integers: also add each token's magnitude x/V to its embedding (--no-int-value: "
        "each token has only its own learned vector, so order is learned per token)",
    )
    floats: bool = option(False, "sort floats uniform in [0, 1] instead of integers (needs --decoder pointer)")
    decoder: Literal["state-only", "teacher", "attention", "pointer"] = option(
        "pointer",
        "state-only: the encoder's final state is all the decoder gets, its inputs are zeros; "
        "teacher: the previous output is the next input; attention: Luong attention over the "
        "encoder outputs; pointer: points at input positions",
    )
    cell: str = cell_option(
        "lstm",
        "recurrent cell of the encoder and the decoder: a built-in name, or "
        "MODULE:CLASS for a GatedCell subclass of your own",
    )
    embed: int = option(64, "size of each number's embedding")
    hidden: int = option(128, "encoder hidden size per direction (the decoder's is directions x this)")
    attn: int = option(64, "size of the additive score layer of the attention and pointer decoders")
    layers: int = option(1, "layers of the encoder and of the decoder")
    bidirectional: bool = option(True, "bidirectional encoder")
    batch_size: int = option(128, "sequences per step, summed over all processes")
    beam: int = option(1, "beam width of evaluation and prediction (1 = greedy)", resumable=True)
    eval_size: int = option(1000, "held-out sequences per length (fixed sets, the same for every run)")
    data_seed: int = option(0, "seed of the training data stream (test sets never depend on it)")
    max_input_len: int = option(256, "longest sequence `rnnkit eval` and `rnnkit predict` accept")

    # spellings of earlier versions, still accepted on the command line with a warning (rnnkit.cli.flags)
    renamed_flags: ClassVar[dict[str, tuple[str, ...]]] = {
        "--n": ("min_len", "max_len"),
        "--n-min": ("min_len",),
        "--n-max": ("max_len",),
        "--max-n": ("max_input_len",),
    }
    renamed_values: ClassVar[dict[str, dict[str, str]]] = {"decoder": {"seed": "state-only"}}
    # the decoder runs one step at a time (teacher-forced, greedy and beam alike): a mask meant for a
    # whole sequence would be drawn again at every step, so the regularisers act on the encoder alone
    flag_groups: ClassVar[dict[str, str]] = {
        GROUP: "in training only, on the encoder only (the decoder runs one step at a time, where a mask "
        "meant for a whole sequence would be drawn again at every step); all 0, off, by default"
    }

    @staticmethod
    def upgrade_saved(values: dict) -> dict:
        """A config.json of an earlier version: its keys renamed as the flags were, its decoder names
        too, and `int_value` False when absent (its default then)."""
        values = dict(values)
        n = values.pop("n", None)
        for old, new in (("n_min", "min_len"), ("n_max", "max_len"), ("max_n", "max_input_len")):
            if old in values:
                values.setdefault(new, values.pop(old))
        if n is not None:
            values["min_len"] = values["max_len"] = n
        values.setdefault("int_value", False)
        if "decoder" in values:
            values["decoder"] = SortConfig.renamed_values["decoder"].get(values["decoder"], values["decoder"])
        return values

    def __post_init__(self):
        for name in (
            "min_len",
            "max_len",
            "vocab",
            "embed",
            "hidden",
            "attn",
            "layers",
            "batch_size",
            "beam",
            "eval_size",
            "max_input_len",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.min_len <= self.max_len <= self.max_input_len:
            raise UsageError(
                f"need --min-len <= --max-len <= --max-input-len, got {self.min_len}, {self.max_len}, "
                f"{self.max_input_len}"
            )
        if self.floats and self.decoder not in POINTS:
            raise UsageError(
                f"--floats needs --decoder pointer: the {self.decoder!r} decoder emits one of V "
                f"integer tokens, and real numbers have no vocabulary"
            )
        # a cell of your own that cannot be imported fails here, in one line
        self.check_regularisers(resolve_cell(self.cell))

    @property
    def lengths(self) -> tuple[int, int]:
        """(shortest, longest) training length."""
        return self.min_len, self.max_len


@dataclass(frozen=True)
class SortEvalOptions:
    lengths: tuple[int, ...] = option(
        (),
        "sequence lengths to evaluate, e.g. --lengths 5 10 20 50 "
        "(default: the shortest, middle and longest training length)",
    )
    renamed_flags: ClassVar[dict[str, tuple[str, ...]]] = {"--n": ("lengths",)}


class SortTask(Task):
    name = "sort"
    Config = SortConfig
    EvalOptions = SortEvalOptions
    items_name = "samples"
    best_metric = "accuracy"
    higher_is_better = True

    def __init__(self, config: SortConfig, run_dir: Path):
        super().__init__(config, run_dir)
        self._test_sets: dict[int, SortBatch] = {}

    def build_model(self) -> nn.Module:
        c = self.config
        return SortModel(
            c.decoder,
            c.vocab,
            c.floats,
            embed=c.embed,
            hidden=c.hidden,
            num_layers=c.layers,
            bidirectional=c.bidirectional,
            cell=c.cell,
            attn=c.attn,
            int_value=c.int_value,
            regularisers=c,
        )

    # ---- training --------------------------------------------------------------------------------
    def train_batch(self, step: int, rank: int, world_size: int) -> SortBatch:
        c = self.config
        rows = shard_range(c.batch_size, rank, world_size)
        # one length per step for every process (rank 0's stream), so the batch needs no padding
        n = draw_length(step_generator(c.data_seed, step, 0, stream="length"), *c.lengths)
        return sample(step_generator(c.data_seed, step, rank), len(rows), n, c.vocab, c.floats)

    def loss(self, model: nn.Module, batch: SortBatch) -> tuple[torch.Tensor, int]:
        _, loss = model(batch.inputs, batch.order)
        return loss, batch.inputs.shape[0]

    # ---- evaluation ------------------------------------------------------------------------------
    def default_eval_lengths(self) -> list[int]:
        lo, hi = self.config.lengths
        return sorted({lo, (lo + hi) // 2, hi})

    def evaluate(
        self, model: nn.Module, data: str | None = None, options: SortEvalOptions | None = None
    ) -> dict[str, float]:
        """Metrics per length on the fixed test sets (or on the sequences of the file `data`, one per
        line), decoded with the config's beam width."""
        options = options or SortEvalOptions()
        beam = self.config.beam
        if data is not None:
            groups = self._file_batches(data)
        else:
            for n in options.lengths:
                if not 1 <= n <= self.config.max_input_len:
                    raise UsageError(
                        f"--lengths {n} is outside the lengths this model accepts, [1, {self.config.max_input_len}]"
                    )
            groups = {n: self._test_set(n) for n in (options.lengths or self.default_eval_lengths())}
        device = device_of(model)
        per_n: dict[str, float] = {}
        totals = {"loss": 0.0, "accuracy": 0.0, "exact": 0.0}
        for n, batch in groups.items():
            batch = move_to(batch, device)
            m = score(model, batch, beam)
            for key, value in m.items():
                per_n[f"{key}@{n}"] = value
                totals[key] += value / len(groups)
        return totals | per_n

    def _test_set(self, n: int) -> SortBatch:
        if n not in self._test_sets:
            c = self.config
            self._test_sets[n] = test_set(n, c.eval_size, c.vocab, c.floats)
        return self._test_sets[n]

    def _file_batches(self, path: str) -> dict[int, SortBatch]:
        """A file of sequences, one per line, grouped by length."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read --data {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(
                f"cannot read --data {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
            ) from None
        by_length: dict[int, list] = {}
        for number, line in sequence_lines(lines):
            values = parse_sequence(line, self.config, where=f"{path} line {number}")
            by_length.setdefault(len(values), []).append(values)
        if not by_length:
            raise UsageError(f"--data {path} holds no sequences")
        dtype = torch.float32 if self.config.floats else torch.long
        return {n: make_batch(torch.tensor(rows, dtype=dtype)) for n, rows in sorted(by_length.items())}

    # ---- use -------------------------------------------------------------------------------------
    def sort_line(self, model: nn.Module, text: str, where: str) -> str:
        """One sequence as text -> the model's sorted output as text, numbers separated by single spaces.
        A pointer prints the chosen input tokens exactly as given; a token decoder prints its tokens."""
        values = parse_sequence(text, self.config, where)
        dtype = torch.float32 if self.config.floats else torch.long
        inputs = torch.tensor([values], dtype=dtype, device=device_of(model))  # (1, N)
        sorter = cast(SortModel, model)  # this task's model (build_model)
        beam = self.config.beam
        with torch.no_grad():
            if sorter.points:
                tokens = split_tokens(text)
                positions = choose(sorter, inputs, beam)[0].tolist()
                return " ".join(tokens[p] for p in positions)
            return " ".join(str(v) for v in decode(sorter, inputs, beam)[0].tolist())


@torch.no_grad()
def score(model: nn.Module, batch: SortBatch, beam: int, chunk: int = 1000) -> dict[str, float]:
    """Teacher-forced loss, per-element accuracy and exact match of `model` on `batch`."""
    loss_sum, right, exact, total = 0.0, 0, 0, 0
    for start in range(0, batch.inputs.shape[0], chunk):
        inputs, targets, order = (t[start : start + chunk] for t in batch)
        _, loss = model(inputs, order)
        output = decode(cast(SortModel, model), inputs, beam)  # (b, N): the sort task's model
        hit = output == targets
        loss_sum += float(loss) * inputs.shape[0]
        right += int(hit.sum())
        exact += int(hit.all(dim=1).sum())
        total += inputs.shape[0]
    n = batch.inputs.shape[1]
    return {"loss": loss_sum / total, "accuracy": right / (total * n), "exact": exact / total}


# ---- text in, text out ----------------------------------------------------------------------------
_SEPARATORS = re.compile(r"[\s,]+")


def sequence_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of each line of a file or of stdin, lazily, except the blank lines at
    the very end, which are dropped (a file's final newline and extra blank lines are not sequences).
    A blank line followed by a sequence is kept, so `parse_sequence` refuses it as empty."""
    blank: list[tuple[int, str]] = []  # blank lines not yet known to be followed by a sequence
    for number, line in enumerate(lines, 1):
        if not split_tokens(line):
            blank.append((number, line))
            continue
        yield from blank
        blank.clear()
        yield number, line


def split_tokens(text: str) -> list[str]:
    """Numbers separated by spaces and/or commas."""
    return [t for t in _SEPARATORS.split(text.strip()) if t]


def parse_sequence(text: str, config: SortConfig, where: str) -> list:
    """Parse one sequence for a model of `config`; UsageError naming `where` for anything it can't sort."""
    tokens = split_tokens(text)
    if not tokens:
        raise UsageError(f"{where}: empty, expected numbers separated by spaces or commas")
    if len(tokens) > config.max_input_len:
        raise UsageError(
            f"{where}: {len(tokens)} numbers, longer than this model supports (at most "
            f"{config.max_input_len}, its --max-input-len)"
        )
    values = []
    for i, token in enumerate(tokens, 1):
        try:
            value = float(token)
        except ValueError:
            raise UsageError(f"{where}: {token!r} (number {i}) is not a number") from None
        if config.floats:
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise UsageError(
                    f"{where}: {token!r} (number {i}) is outside [0, 1], the range this float model was trained on"
                )
            values.append(value)
        else:
            if not (value.is_integer() and 0 <= value < config.vocab):
                raise UsageError(
                    f"{where}: {token!r} (number {i}) is not an integer in [0, {config.vocab}), "
                    f"the tokens this model knows"
                )
            values.append(int(value))
    return values
