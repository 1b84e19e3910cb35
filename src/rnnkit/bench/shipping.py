"""Shipped models against eager rnnkit: torch.compile, torch.compile of torch.nn, onnxruntime.

    python -m rnnkit.bench.shipping [--threads 1]

Two models, inference on the CPU in float32: a classifier (embedding, a 2-layer LSTM of 128 over
batch 32 x 64 tokens with lengths, a linear head on the final state) and one generation step of a
language model (batch 1, one token with the state carried, a 2-layer LSTM of 256, logits over 256
bytes). Each is timed as eager rnnkit, ``torch.compile`` of it (Inductor, ``dynamic=True``),
``torch.compile`` of the same model on ``torch.nn.LSTM`` and, where onnxruntime is installed, the
ONNX file (core/onnx_ops.py) in onnxruntime; medians of alternated calls (``run.compare``), each
printed as milliseconds and as eager rnnkit's time over it (above 1: faster than eager).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import rnnkit
from rnnkit.bench.run import compare


class Classifier(nn.Module):
    """Tokens (B, T) and lengths (B,) -> class logits (B, 4), from the last layer's final state."""

    def __init__(self, rnn: nn.Module, vocab: int = 256, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = rnn
        self.head = nn.Linear(hidden, 4)

    def forward(self, tokens, lengths):
        x = self.embed(tokens)
        if isinstance(self.rnn, rnnkit.Recurrent):
            _, (h, _) = self.rnn(x, lengths=lengths)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class LMStep(nn.Module):
    """One generation step: a token (B, 1) and the state in, logits (B, 256) and the state out."""

    def __init__(self, rnn: nn.RNNBase, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, vocab)

    def forward(self, token, h, c):
        out, (h, c) = self.rnn(self.embed(token), (h, c))
        return self.head(out[:, -1]), h, c


def _ort(model, args, dynamic_shapes, names):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from rnnkit.core import onnx_ops

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    onnx_ops.export(model, args, path, dynamic_shapes=dynamic_shapes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: a.numpy() for name, a in zip(names, args)}
    return lambda: session.run(None, feeds)


def _cases():
    torch.manual_seed(0)
    ours: nn.Module = Classifier(rnnkit.LSTM(64, 128, num_layers=2, batch_first=True)).eval()
    theirs: nn.Module = Classifier(nn.LSTM(64, 128, num_layers=2, batch_first=True)).eval()
    theirs.load_state_dict(dict(zip(theirs.state_dict(), ours.state_dict().values())))
    tokens, lengths = torch.randint(0, 256, (32, 64)), torch.randint(16, 65, (32,))
    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    yield ("classifier, B=32, T=64", ours, theirs, (tokens, lengths), ({0: B, 1: T}, {0: B}), ["tokens", "lengths"])
    ours = LMStep(rnnkit.LSTM(64, 256, num_layers=2, batch_first=True)).eval()
    theirs = LMStep(nn.LSTM(64, 256, num_layers=2, batch_first=True)).eval()
    token, h, c = torch.randint(0, 256, (1, 1)), torch.randn(2, 1, 256), torch.randn(2, 1, 256)
    yield ("LM step, batch 1, 2 x 256", ours, theirs, (token, h, c), None, ["token", "h", "c"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rnnkit.bench.shipping", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and onnxruntime's)")
    parser.add_argument("--repeats", type=int, default=20, help="alternated calls per pair, at least")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per call; x: eager rnnkit's time over it")
    with torch.no_grad():
        for name, ours, theirs, inputs, dynamic, names in _cases():
            print(name)
            _run_case(ours, theirs, inputs, dynamic, names, args.repeats)


def _run_case(ours, theirs, inputs, dynamic, names, repeats: int) -> None:
    eager = lambda: ours(*inputs)
    rows = {
        "torch.compile(rnnkit)": torch.compile(ours, dynamic=True),
        "torch.compile(torch.nn)": torch.compile(theirs, dynamic=True),
    }
    timed = {label: (lambda f=f: f(*inputs)) for label, f in rows.items()}
    ort = _ort(ours, inputs, dynamic, names)
    if ort is not None:
        timed["onnxruntime"] = ort
    for label, fn in timed.items():
        e, other, _ = compare(eager, fn, repeats)
        print(f"  {label:24s} {other * 1e3:8.3f} ms   eager rnnkit {e * 1e3:8.3f} ms   x{e / other:5.2f}")


if __name__ == "__main__":
    main()
