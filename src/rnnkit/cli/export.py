"""`rnnkit export RUN_DIR --format onnx|pt2 --out FILE`: a trained run's model as one file to ship.

`--format onnx` writes an ONNX model (rnnkit's recurrent layers as ONNX's own LSTM/GRU/RNN nodes,
docs/shipping.md) and needs the `export` extra (onnx, onnxscript, onnxruntime); `--format pt2`
writes a `torch.export` program (`torch.export.save`), which `torch.export.load` reads in a process
where rnnkit's operators are registered: one that has run `import rnnkit`, or one with nothing of
rnnkit's Python code that has loaded rnnkit's C++ library (`torch.ops.load_library(path)`, the path
`rnnkit.core.native.library_path()` gives; docs/shipping.md). Batch size and length stay dynamic.
The command then evaluates the run's validation split twice, with the eager model and through the
written file (onnxruntime for ONNX), prints both metrics and fails (exit code 1) if they differ.

Tasks: the classifier (tokens and lengths in, class logits out) and the language model as a step
function (tokens (B, T) and the state in, logits and the state out; T = 1 is one generation step, and
the metric is computed by running the file over the validation text chunk by chunk with the state
carried), and the sorter as two files, its encoder (numbers (B, N) in; the encoder's outputs and the
decoder's first state out) at FILE and one decoder step (the previous choice, the encoder's outputs and
the state in; logits and the new state out) at FILE with ``-step`` before its suffix, which greedy or
beam decoding drives step by step. Each task's part is one entry of EXPORTERS.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from rnnkit.cli.command import Command
from rnnkit.cli.runs import add_run_flags, load_selected_run
from rnnkit.common.errors import UsageError
from rnnkit.tasks.regularisers import without_regularisers
from rnnkit.tasks.sort.model import SortModel

TOLERANCE = 1e-4  # largest difference between the two metrics that counts as reproduced


class _Logits(nn.Module):
    """The classifier with its tokens padded to whole patches: (B, T) bytes and lengths -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, lengths):
        return self.model(x, lengths)[0]


class _Exported(nn.Module):
    """The written file behind the model's call signature, so the task's own evaluation runs it."""

    def __init__(self, run, patch: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # the task reads the device from it
        self.call, self.patch = run, patch

    def forward(self, x, lengths):
        pad = -x.shape[1] % self.patch  # the program's length is a whole number of patches
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return self.call(x.long(), lengths.long()), None  # the file was written for int64 tokens and lengths


def _classifier(loaded, fmt: str, out: Path) -> nn.Module:
    model = _Logits(loaded.model).eval()
    patch = loaded.task.config.patch
    x = torch.randint(0, 256, (3, 4 * patch))
    lengths = torch.tensor([4 * patch, 2 * patch, 1])
    B, steps = torch.export.Dim("batch", min=2), torch.export.Dim("patches", min=2)
    dims = ({0: B, 1: patch * steps}, {0: B})
    if fmt == "pt2":
        program = torch.export.export(model, (x, lengths), dynamic_shapes=dims)
        torch.export.save(program, str(out))
        loaded_program = torch.export.load(str(out)).module()
        return _Exported(lambda x, lengths: loaded_program(x, lengths), patch)
    ort = _onnxruntime()
    _write_onnx(model, (x, lengths), out, dims, ["tokens", "lengths"], output_names=["logits"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return _Exported(
        lambda x, lengths: torch.from_numpy(session.run(None, {"tokens": x.numpy(), "lengths": lengths.numpy()})[0]),
        patch,
    )


class _Step(nn.Module):
    """A language model as a step function: tokens (B, T) and the state's parts (L*D, B, H) in,
    logits (B, T, V) and the new state's parts out; at T = 1 one generation step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, *parts):
        rnn: Any = self.model.rnn  # an rnnkit layer: State, num_layers, num_directions, hidden_size
        state = rnn.State(*parts) if len(parts) > 1 else parts[0]
        out = self.model(idx, None, state)
        final = out.state if isinstance(out.state, tuple) else (out.state,)
        return (out.logits, *final)


class _ExportedLM(nn.Module):
    """The written step function behind the language model's call ``model(idx, None, state)``."""

    def __init__(self, run, rnn: nn.Module):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # the task reads the device from it
        self.call, self.rnn = run, rnn

    def forward(self, idx, targets=None, state=None):
        from rnnkit.tasks.lm.model import LMOutput

        rnn: Any = self.rnn  # an rnnkit layer: State, num_layers, num_directions, hidden_size
        if state is None:
            shape = (rnn.num_layers * rnn.num_directions, idx.shape[0], rnn.hidden_size)
            parts = tuple(torch.zeros(shape) for _ in rnn.State._fields)
        else:
            parts = tuple(state) if isinstance(state, tuple) else (state,)
        logits, *final = self.call(idx.long(), *parts)
        return LMOutput(logits, None, rnn.State(*final) if len(final) > 1 else final[0])


def _language_model(loaded, fmt: str, out: Path) -> nn.Module:
    model = _Step(loaded.model).eval()
    rnn = loaded.model.rnn
    names = rnn.State._fields
    parts = tuple(torch.zeros(rnn.num_layers * rnn.num_directions, 3, rnn.hidden_size) for _ in names)
    idx = torch.randint(0, loaded.model.vocab_size, (3, 4))
    B, T = torch.export.Dim("batch", min=1), torch.export.Dim("steps", min=1)
    dims = ({0: B, 1: T}, tuple({1: B} for _ in names))  # forward(idx, *parts): the parts are one argument
    if fmt == "pt2":
        program = torch.export.export(model, (idx, *parts), dynamic_shapes=dims)
        torch.export.save(program, str(out))
        loaded_program = torch.export.load(str(out)).module()
        return _ExportedLM(lambda *a: loaded_program(*a), rnn)
    ort = _onnxruntime()
    inputs = ["tokens", *(f"state_{n}" for n in names)]
    _write_onnx(model, (idx, *parts), out, dims, inputs, output_names=["logits", *(f"next_{n}" for n in names)])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return _ExportedLM(
        lambda *a: [torch.from_numpy(r) for r in session.run(None, {name: t.numpy() for name, t in zip(inputs, a)})],
        rnn,
    )


class _ShippedMemory(NamedTuple):
    """The sorter's memory (tasks/sort/model.py's ``Memory``) with the decoder's first state beside it, so
    beam search, which reorders the memory's rows, reorders that state with them."""

    inputs: Tensor  # (B, N) the numbers
    embedded: Tensor  # (B, N, E)
    outputs: Tensor  # (B, N, D*H)
    state: tuple  # per decoder layer, the cell state
    start: Any  # decoder.start(memory), written by the encoder's file


class _Encoder(nn.Module):
    """The sorter's encoder and its decoder's start as one function: numbers (B, N) -> the tensors of the
    memory and of the first decoder state, flat (``tree_leaves`` order)."""

    model: Any  # the sorter (tasks/sort/model.py's SortModel)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        memory = self.model.encode(inputs)
        start = self.model.decoder.start(memory)
        return tuple(pytree.tree_leaves((memory.embedded, memory.outputs, memory.state, start)))


class _DecoderStep(nn.Module):
    """One decoder step: the previous choice (B,), the encoder's outputs (B, N, D*H) and the decoder
    state's tensors in, the logits (B, C) and the new state's tensors out."""

    model: Any  # the sorter (tasks/sort/model.py's SortModel)

    def __init__(self, model: nn.Module, spec: pytree.TreeSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, prev, outputs, *leaves):
        state = pytree.tree_unflatten(list(leaves), self.spec)
        memory = _ShippedMemory(prev, outputs, outputs, (), state)  # a step reads only the encoder's outputs
        logits, state = self.model.decoder.step(prev, state, memory)
        return (logits, *pytree.tree_leaves(state))


class _ShippedDecoder:
    """The decoder's step contract (tasks/sort/search.py's ``Decoder``) over the written step file."""

    def __init__(self, run, spec: pytree.TreeSpec):
        self.run, self.spec = run, spec

    def start(self, memory: _ShippedMemory):
        return memory.start

    def step(self, prev, state, memory: _ShippedMemory):
        logits, *leaves = self.run(prev, memory.outputs, *pytree.tree_leaves(state))
        return logits, pytree.tree_unflatten(leaves, self.spec)


class _ExportedSorter(nn.Module):
    """The two written files behind the sorter's interface (``encode``, ``decoder``, ``forward``), so the
    task's own evaluation (teacher-forced loss, greedy or beam decoding) runs them."""

    def __init__(self, model: nn.Module, encode, step, spec: pytree.TreeSpec):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # the task reads the device from it
        self.points, self.floats, self.vocab = model.points, model.floats, model.vocab
        self._encode, self._spec = encode, spec
        self.decoder = _ShippedDecoder(step, spec.child(3))

    def encode(self, inputs):
        embedded, outputs, *rest = self._encode(inputs)
        _, _, state, start = pytree.tree_unflatten([embedded, outputs, *rest], self._spec)
        return _ShippedMemory(inputs, embedded, outputs, state, start)

    def targets_of(self, inputs, order):
        return SortModel.targets_of(cast(SortModel, self), inputs, order)

    def forward(self, inputs, order=None):
        return SortModel.forward(cast(SortModel, self), inputs, order)


def _free_length(shapes: list[tuple[int, ...]], avoid: int) -> int:
    """A sequence length for the example that no other dimension of the model's tensors equals, so that
    only the dimensions that are the length are marked dynamic."""
    taken = {d for shape in shapes for d in shape} | {avoid}
    return next(n for n in (5, 7, 11, 13, 17, 19, 23) if n not in taken)


def _sorter(loaded, fmt: str, out: Path) -> nn.Module:
    model = loaded.model.eval()
    config = loaded.task.config
    B = 3
    sizes = [tuple(p.shape) for p in model.parameters()]
    N = _free_length(sizes, B)
    inputs = torch.rand(B, N) if config.floats else torch.randint(0, config.vocab, (B, N))
    encoder = _Encoder(model).eval()
    with torch.no_grad():
        leaves = encoder(inputs)
        memory = model.encode(inputs)
        spec = pytree.tree_structure((memory.embedded, memory.outputs, memory.state, model.decoder.start(memory)))
    outputs, state_leaves = leaves[1], list(leaves[2 + len(pytree.tree_leaves(memory.state)) :])
    state_spec = spec.child(3)
    step = _DecoderStep(model, state_spec).eval()
    prev = torch.randint(0, N, (B,))
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)

    def dims(t: Tensor) -> dict:
        return {0: batch, **({1: length} if t.dim() > 1 and t.shape[1] == N else {})}

    encoder_dims = ({0: batch, 1: length},)
    step_args = (prev, outputs, *state_leaves)
    step_dims = (dims(prev), dims(outputs), tuple(dims(t) for t in state_leaves))  # forward(prev, outputs, *leaves)
    encoder_out, step_out = _paths(out)
    if fmt == "pt2":
        for module, args, dyn, path in (
            (encoder, (inputs,), encoder_dims, encoder_out),
            (step, step_args, step_dims, step_out),
        ):
            torch.export.save(torch.export.export(module, args, dynamic_shapes=dyn), str(path))
        encoder_program = torch.export.load(str(encoder_out)).module()
        step_program = torch.export.load(str(step_out)).module()
        return _ExportedSorter(model, encoder_program, step_program, spec)
    ort = _onnxruntime()
    _write_onnx(encoder, (inputs,), encoder_out, encoder_dims, ["inputs"])
    names = ["prev", "outputs", *(f"state_{i}" for i in range(len(state_leaves)))]
    _write_onnx(step, step_args, step_out, step_dims, names)
    encoder_session = ort.InferenceSession(str(encoder_out), providers=["CPUExecutionProvider"])
    step_session = ort.InferenceSession(str(step_out), providers=["CPUExecutionProvider"])
    fed = [i.name for i in step_session.get_inputs()]  # the exporter drops inputs a step never reads

    def run_encoder(x):
        return [torch.from_numpy(a) for a in encoder_session.run(None, {"inputs": x.numpy()})]

    def run_step(*args):
        feeds = {name: t.numpy() for name, t in zip(names, args) if name in fed}
        return [torch.from_numpy(a) for a in step_session.run(None, feeds)]

    return _ExportedSorter(model, run_encoder, run_step, spec)


def _paths(out: Path) -> tuple[Path, Path]:
    """The sorter's two files: ``OUT`` holds the encoder, ``OUT`` with ``-step`` before its suffix the decoder step."""
    return out, out.with_name(f"{out.stem}-step{out.suffix}")


def _write_onnx(model: nn.Module, args: tuple, out: Path, dims: tuple, names: list[str], **kwargs) -> None:
    """``onnx_ops.export`` with the inputs named, then a check that every dimension marked dynamic (the
    batch, the length) stayed a name in the file: torch.onnx falls back to the example's size where the
    model fixes one (a shape read as a plain int), and such a file would run at that size alone."""
    from rnnkit.core import onnx_ops

    onnx_ops.export(model, args, out, dynamic_shapes=dims, input_names=names, **kwargs)
    flat: list[dict] = []  # one per input name: forward(a, *rest) has its *rest as one nested entry
    for entry in dims:
        flat.extend(entry if isinstance(entry, tuple) else (entry,))
    fixed = fixed_axes(out, {name: set(axes) for name, axes in zip(names, flat)})
    if fixed:
        raise UsageError(
            f"--format onnx: {out.name} came out with {', '.join(fixed)} fixed at the example's size, so it "
            f"would run at that batch size and length alone"
        )


def fixed_axes(path: Path, dynamic: dict[str, set[int]]) -> list[str]:
    """The axes of the ONNX file's inputs that ``dynamic`` (input name -> axes) marks dynamic but the file
    gives a fixed size, as ``name[axis]=size``; inputs the file dropped (never read) are skipped."""
    import onnx

    fixed = []
    for value in onnx.load(str(path), load_external_data=False).graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis in sorted(dynamic.get(value.name, ())):
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"{value.name}[{axis}]={dims[axis].dim_value}")
    return fixed


def _onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError('--format onnx needs onnxruntime: pip install "rnnkit[export]"') from None
    return ort


# task name -> (loaded run, format, output path) -> the written file as a module with the model's signature
EXPORTERS = {"classify": _classifier, "lm": _language_model, "sort": _sorter}


def add_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("run_dir", help="run directory written by `rnnkit train`")
    parser.add_argument(
        "--format",
        choices=["onnx", "pt2"],
        required=True,
        help="onnx: an ONNX model (onnxruntime); pt2: a torch.export program",
    )
    parser.add_argument("--out", required=True, help="the file to write")
    add_run_flags(parser, device="cpu")


def run(args: argparse.Namespace) -> int:
    loaded = load_selected_run(args, device="cpu")
    name = loaded.info.task
    if name not in EXPORTERS:
        raise UsageError(f"rnnkit export does not handle {name} runs yet; it exports: {', '.join(EXPORTERS)}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out: no directory {out.parent}")
    without_regularisers(loaded.model.eval())  # they act in training only: the layers evaluation runs
    with tempfile.TemporaryDirectory():
        exported = EXPORTERS[name](loaded, args.format, out)
    with torch.no_grad():
        eager = loaded.task.evaluate(loaded.model)
        shipped = loaded.task.evaluate(exported)
    written = [out, _paths(out)[1]] if name == "sort" else [out]  # the sorter: encoder and decoder step
    print(f"wrote {' and '.join(map(str, written))} ({args.format})")
    worst = 0.0
    for key, value in eager.items():
        worst = max(worst, abs(float(value) - float(shipped[key])))
        print(f"  {key:<20} eager {float(value):.6g}   {args.format} {float(shipped[key]):.6g}")
    if worst > TOLERANCE:
        print(f"the exported file does not reproduce the run's metrics (largest difference {worst:.3g})")
        return 1
    return 0


EXPORT = Command(add_arguments, run)
