"""A word-level LSTM language model written for torch.nn, run with rnnkit by one import.

In the style of PyTorch's word language model example: the corpus is one long stream of word ids
cut into ``batch_size`` columns (time-major batches, (bptt, B)); the hidden state is carried from
batch to batch and detached; gradients are clipped; plain SGD updates the weights through
``.data``; the whole model is saved with ``torch.save`` and loaded again, and
``flatten_parameters()`` is called after loading. The only line that knows about rnnkit is the
import switch below: ``--backend torch`` runs ``torch.nn.LSTM``, ``--backend rnnkit`` runs
``rnnkit.LSTM``, with the same numbers (same seed, dropout 0).

    python examples/word_language_model.py --data input.txt --backend rnnkit --epochs 1
    python examples/word_language_model.py --data input.txt --compare      # both, and the speed ratio

The text file is split 80/10/10 into train, validation and test; every line ends in ``<eos>``.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


def recurrent_layers(backend: str):
    """The one import switch: the module the LSTM comes from."""
    if backend == "rnnkit":
        import rnnkit as rnn
    else:
        from torch import nn as rnn
    return rnn


# -- data ---------------------------------------------------------------------------------------


class Corpus:
    """Word ids of a text file's train / valid / test parts (80/10/10 by lines), ``<eos>`` per line."""

    def __init__(self, text: str):
        lines = text.splitlines()
        n = len(lines)
        parts = lines[: int(0.8 * n)], lines[int(0.8 * n) : int(0.9 * n)], lines[int(0.9 * n) :]
        self.word2idx: dict[str, int] = {}
        self.train, self.valid, self.test = (self.tokenize(part) for part in parts)

    def tokenize(self, lines: list[str]) -> torch.Tensor:
        ids = []
        for line in lines:
            for word in [*line.split(), "<eos>"]:
                ids.append(self.word2idx.setdefault(word, len(self.word2idx)))
        return torch.tensor(ids, dtype=torch.long)


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A stream of ids -> (N, B): B columns, each a contiguous slice of the stream."""
    n = data.size(0) // batch_size
    return data[: n * batch_size].view(batch_size, n).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i .. i+bptt of ``source`` as input (T, B), the next rows flattened as targets (T*B,)."""
    T = min(bptt, len(source) - 1 - i)
    return source[i : i + T], source[i + 1 : i + 1 + T].reshape(-1)


# -- model --------------------------------------------------------------------------------------


class RNNModel(nn.Module):
    """Embedding -> LSTM (time-major) -> linear decoder, with dropout around the LSTM."""

    def __init__(self, rnn, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))  # (T, B, ninp)
        output, hidden = self.rnn(emb, hidden)  # (T, B, nhid)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, batch_size: int):
        weight = next(self.parameters())
        return (
            weight.new_zeros(self.nlayers, batch_size, self.nhid),
            weight.new_zeros(self.nlayers, batch_size, self.nhid),
        )


def repackage_hidden(h):
    """Detach the hidden state from the graph of the previous batch."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


# -- training -----------------------------------------------------------------------------------


def train_epoch(
    model, data, lr: float, bptt: int, clip: float, batch_size: int, max_batches: int | None = None, times=None
):
    """One pass over ``data`` (N, B); returns each batch's loss (and appends each batch's seconds to ``times``)."""
    model.train()
    hidden = model.init_hidden(batch_size)
    losses = []
    for batch, i in enumerate(range(0, data.size(0) - 1, bptt)):
        if max_batches is not None and batch >= max_batches:
            break
        start = time.perf_counter()
        inputs, targets = get_batch(data, i, bptt)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(inputs, hidden)
        loss = F.nll_loss(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        losses.append(loss.item())
        if times is not None:
            times.append(time.perf_counter() - start)
    return losses


def evaluate(model, data, bptt: int, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    hidden = model.init_hidden(batch_size)
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            inputs, targets = get_batch(data, i, bptt)
            output, hidden = model(inputs, hidden)
            hidden = repackage_hidden(hidden)
            total += len(inputs) * F.nll_loss(output, targets).item()
            count += len(inputs)
    return total / max(count, 1)


def run(
    text: str,
    backend: str,
    *,
    emsize: int = 200,
    nhid: int = 200,
    nlayers: int = 2,
    lr: float = 20.0,
    clip: float = 0.25,
    epochs: int = 1,
    batch_size: int = 20,
    eval_batch_size: int = 10,
    bptt: int = 35,
    dropout: float = 0.0,
    seed: int = 1111,
    max_batches: int | None = None,
    log=print,
) -> dict:
    """Train, save the whole model, load it again and test it; returns the losses and times."""
    rnn = recurrent_layers(backend)
    torch.manual_seed(seed)
    corpus = Corpus(text)
    train_data = batchify(corpus.train, batch_size)
    val_data = batchify(corpus.valid, eval_batch_size)
    test_data = batchify(corpus.test, eval_batch_size)
    model = RNNModel(rnn, len(corpus.word2idx), emsize, nhid, nlayers, dropout)
    losses, seconds, batch_seconds = [], 0.0, []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        epoch_losses = train_epoch(model, train_data, lr, bptt, clip, batch_size, max_batches, batch_seconds)
        seconds += time.perf_counter() - start
        losses += epoch_losses
        val_loss = evaluate(model, val_data, bptt, eval_batch_size)
        log(
            f"{backend}: epoch {epoch} | {len(epoch_losses)} batches | {seconds:.1f} s | "
            f"train loss {sum(epoch_losses) / len(epoch_losses):.3f} | valid ppl {math.exp(val_loss):.1f}"
        )
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole model, as the example does
    buffer.seek(0)
    model = torch.load(buffer, weights_only=False)
    model.rnn.flatten_parameters()
    test_loss = evaluate(model, test_data, bptt, eval_batch_size)
    log(f"{backend}: test loss {test_loss:.3f} | test ppl {math.exp(test_loss):.1f}")
    return {
        "losses": losses,
        "train_seconds": seconds,
        "batch_seconds": batch_seconds,
        "batches": len(losses),
        "test_loss": test_loss,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a text file, e.g. a corpus of plays or articles")
    parser.add_argument("--quick", action="store_true", help="a few steps of both backends on a small made-up text")
    parser.add_argument("--backend", choices=["torch", "rnnkit"], default="rnnkit")
    parser.add_argument("--compare", action="store_true", help="run both backends, compare losses and speed")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    parser.add_argument("--emsize", type=int, default=200)
    parser.add_argument("--nhid", type=int, default=200)
    parser.add_argument("--nlayers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        words = [
            "the",
            "old",
            "king",
            "sees",
            "the",
            "quiet",
            "sea",
            "and",
            "the",
            "brave",
            "queen",
            "finds",
            "a",
            "red",
            "ship",
        ]
        text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200))
        args.compare, args.max_batches, args.emsize, args.nhid, args.batch_size = True, 10, 16, 16, 4
    elif args.data is None:
        parser.error("--data is required (or --quick)")
    else:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    options = dict(
        emsize=args.emsize,
        nhid=args.nhid,
        nlayers=args.nlayers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        bptt=args.bptt,
        dropout=args.dropout,
        max_batches=args.max_batches,
    )
    backends = ["torch", "rnnkit"] if args.compare else [args.backend]
    results = {backend: run(text, backend, **options) for backend in backends}
    if args.compare:
        a, b = results["torch"]["losses"], results["rnnkit"]["losses"]
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        # the median batch, not the total: the backend that runs first also pays the process's
        # warm-up (allocations, the first kernel calls), and a shared machine's bursts hit one run
        times = {name: statistics.median(results[name]["batch_seconds"]) for name in backends}
        ratio = times["torch"] / times["rnnkit"]
        print(
            f"{len(a)} training steps: largest relative loss difference {worst:.2e}; "
            f"median batch {1e3 * times['torch']:.1f} ms with torch.nn, {1e3 * times['rnnkit']:.1f} ms with rnnkit: "
            f"rnnkit trains {ratio:.2f}x as fast as torch.nn"
        )


if __name__ == "__main__":
    main()
