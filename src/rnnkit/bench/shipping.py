"""Shipped models against eager rnnkit: torch.compile, torch.compile of torch.nn, onnxruntime.

    python -m rnnkit.bench.shipping [--threads 1]

Two models on the CPU in float32, each in inference and in training (forward and backward of a
cross-entropy loss): a classifier (embedding, a 2-layer LSTM of 128 over batch 32 x 64 tokens with
lengths, a linear head on the final state) and a language model (a 2-layer LSTM of 256, logits
over 256 bytes): in inference one generation step (batch 1, one token with the state carried),
in training batch 16 x 64 tokens. Each is timed as eager rnnkit against ``torch.compile`` of it
(Inductor, ``dynamic=True``), against ``torch.compile`` of the same model on ``torch.nn.LSTM``
and, in inference where onnxruntime is installed, against the ONNX file (core/onnx_ops.py) in
onnxruntime; then compiled rnnkit against compiled torch.nn. Each line is a pair of medians of
alternated calls in this process (``run.compare``): the first's time, the second's, and the
second's over the first (above 1: the first is faster).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import rnnkit
from rnnkit.bench.run import compare

RNNKIT_LAYERS = (rnnkit.Recurrent, rnnkit.LSTM)


class Classifier(nn.Module):
    """Tokens (B, T) and lengths (B,) -> class logits (B, 4), from the last layer's final state."""

    def __init__(self, rnn: nn.Module, vocab: int = 256, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = rnn
        self.head = nn.Linear(hidden, 4)

    def forward(self, tokens, lengths):
        x = self.embed(tokens)
        if isinstance(self.rnn, RNNKIT_LAYERS):
            _, (h, _) = self.rnn(x, lengths=lengths)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class LMStep(nn.Module):
    """Tokens (B, T) and the state in, logits (B, T, 256) and the state out: one generation step
    at T = 1."""

    def __init__(self, rnn: nn.RNNBase, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, vocab)

    def forward(self, token, h, c):
        out, (h, c) = self.rnn(self.embed(token), (h, c))
        return self.head(out), h, c


def _ort(model, args, dynamic_shapes, names):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from rnnkit.core import onnx_ops

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    onnx_ops.export(model, args, path, dynamic_shapes=dynamic_shapes, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: a.numpy() for name, a in zip(names, args)}
    return lambda: session.run(None, feeds)


def _pair(ours: nn.Module, theirs: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The same weights in both (rnnkit's layers keep torch.nn's parameter names and order)."""
    theirs.load_state_dict(dict(zip(theirs.state_dict(), ours.state_dict().values())))
    return ours, theirs


def _cases():
    """(name, training, rnnkit's model, torch.nn's, the inputs, a loss of the output or None, ONNX's
    dynamic shapes and input names)."""
    torch.manual_seed(0)
    tokens, lengths = torch.randint(0, 256, (32, 64)), torch.randint(16, 65, (32,))
    labels = torch.randint(0, 4, (32,))
    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    for training in (False, True):
        ours, theirs = _pair(
            Classifier(rnnkit.LSTM(64, 128, num_layers=2, batch_first=True)),
            Classifier(nn.LSTM(64, 128, num_layers=2, batch_first=True)),
        )
        loss = (lambda logits: F.cross_entropy(logits, labels)) if training else None
        onnx = (({0: B, 1: T}, {0: B}), ["tokens", "lengths"])
        yield ("classifier, B=32, T=64", training, ours, theirs, (tokens, lengths), loss, *onnx)
    ours, theirs = _pair(
        LMStep(rnnkit.LSTM(64, 256, num_layers=2, batch_first=True)),
        LMStep(nn.LSTM(64, 256, num_layers=2, batch_first=True)),
    )
    inputs = (torch.randint(0, 256, (1, 1)), torch.randn(2, 1, 256), torch.randn(2, 1, 256))
    yield ("LM step, batch 1, 2 x 256", False, ours, theirs, inputs, None, None, ["token", "h", "c"])
    ours, theirs = _pair(
        LMStep(rnnkit.LSTM(64, 256, num_layers=2, batch_first=True)),
        LMStep(nn.LSTM(64, 256, num_layers=2, batch_first=True)),
    )
    text = torch.randint(0, 256, (16, 65))
    inputs = (text[:, :-1], torch.zeros(2, 16, 256), torch.zeros(2, 16, 256))
    loss = lambda logits: F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten())
    yield ("LM, B=16, T=64", True, ours, theirs, inputs, loss, None, None)


def _call(model: Callable, inputs: tuple, loss: Callable | None) -> Callable[[], object]:
    """A call of ``model``: under no_grad, or (with ``loss``) forward and backward."""
    if loss is None:

        def infer():
            with torch.no_grad():
                return model(*inputs)

        return infer

    def train():
        out = model(*inputs)
        loss(out[0] if isinstance(out, tuple) else out).backward()

    return train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rnnkit.bench.shipping", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and onnxruntime's)")
    parser.add_argument("--repeats", type=int, default=20, help="alternated calls per pair, at least")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per call (medians of alternated pairs)")
    for name, training, ours, theirs, inputs, loss, dynamic, names in _cases():
        print(f"{name}, {'training' if training else 'inference'}")
        ours.train(training), theirs.train(training)
        _run_case(ours, theirs, inputs, loss, dynamic, names, args.repeats)


def _run_case(ours, theirs, inputs, loss, dynamic, names, repeats: int) -> None:
    eager = _call(ours, inputs, loss)
    compiled = _call(torch.compile(ours, dynamic=True), inputs, loss)
    compiled_nn = _call(torch.compile(theirs, dynamic=True), inputs, loss)
    pairs = [
        ("eager rnnkit", eager, "torch.compile(rnnkit)", compiled),
        ("eager rnnkit", eager, "torch.compile(torch.nn)", compiled_nn),
        ("torch.compile(torch.nn)", compiled_nn, "torch.compile(rnnkit)", compiled),
    ]
    if loss is None and names is not None:
        with torch.no_grad():
            ort = _ort(ours, inputs, dynamic, names)
        if ort is not None:
            pairs.append(("eager rnnkit", eager, "onnxruntime", ort))
    for label_a, fn_a, label_b, fn_b in pairs:
        a, b, _ = compare(fn_a, fn_b, repeats)
        print(f"  {label_b:24s} {b * 1e3:8.3f} ms   {label_a:24s} {a * 1e3:8.3f} ms   x{a / b:5.2f}")


if __name__ == "__main__":
    main()
