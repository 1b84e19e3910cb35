"""One-token steps on CUDA replayed from a captured CUDA graph, one graph per batch size.

Generating text steps a stack one token at a time. On a GPU at batch 1 each step is a few small
kernel launches per layer (``step-matmul``: the packed matmul, the gate math), and launching them
from Python costs more than running them. ``step_graphed`` captures ``step.step_layers`` once per
(layer, batch size, dtype) into a ``torch.cuda.CUDAGraph`` and afterwards replays it: one launch
for the whole stack. The weights are packed once (step.py's cache) before the capture, so the graph
reads the packs.

Bookkeeping (``StepGraphs``): a captured graph reads and writes fixed buffers, so a call copies
``x`` and the state into the graph's inputs, replays, and returns copies of its outputs (a later
replay overwrites them). A graph is keyed by the input's shape, dtype and device and is valid
while the weights it was captured with are: every weight's identity, storage and version counter
(step.py's key) is checked at each call, so an optimizer step, ``load_state_dict`` or ``.to()``
re-captures it (a change written through ``.data`` is not seen, as in step.py). At most
``MAX_GRAPHS`` graphs are kept per layer, the least recently used dropped first.

Not graphed (the routing table's ``step-graph`` row passes over them): dropout in training
(a random stream inside a graph), weights made under ``torch.inference_mode()`` (no version
counter to check), and a call made while another graph is being captured.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rnnkit.core import step

MAX_GRAPHS = 8  # captured batch sizes kept per layer
WARMUP = 2  # eager runs on a side stream before a capture (CUDA's libraries allocate their workspaces)
ATTR = "_rnnkit_step_graphs"

Capture = Callable[[Callable[[], tuple]], tuple[Callable[[], None], tuple]]


def why_not(layer, x: Tensor) -> str | None:
    """``None`` where a lean step of ``layer`` on ``x`` can be graphed, else why not."""
    if x.device.type != "cuda":
        return "not a CUDA tensor"
    if layer.training and layer.dropout > 0:
        return "dropout in training"
    if any(p.is_inference() for p in step.weights(step_cells(layer))):
        return "weights made under torch.inference_mode() (no version counter to check)"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def step_cells(layer) -> list:
    modules = layer.__dict__.get("_modules")
    if modules is not None and "cells" in modules:
        return list(modules["cells"]._modules.values())
    return list(layer.cells)


def capture_cuda(fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
    """``fn`` run ``WARMUP`` times on a side stream, then captured: (the graph's replay, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


class StepGraph:
    """One captured step: fixed input buffers, the replay, and the fixed outputs it writes."""

    def __init__(self, run: Callable[[Tensor, Sequence[Tensor]], tuple], x: Tensor, parts: Sequence[Tensor], capture):
        self.x = torch.empty_like(x)
        self.parts = [torch.empty_like(p) for p in parts]
        self.x.copy_(x)
        for mine, p in zip(self.parts, parts):
            mine.copy_(p)
        self.replay, (self.out, self.new) = capture(lambda: run(self.x, self.parts))

    def __call__(self, x: Tensor, parts: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        self.x.copy_(x)
        for mine, p in zip(self.parts, parts):
            mine.copy_(p)
        self.replay()
        return self.out.clone(), [n.clone() for n in self.new]


class StepGraphs:
    """A layer's captured steps, by input shape, dtype and device; each valid for one weights key."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.graphs: OrderedDict[tuple, tuple[tuple, StepGraph]] = OrderedDict()
        self.captures = 0  # how many graphs were captured (a re-capture counts again)

    def step(self, layer, x: Tensor, parts: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        weights_key = step._key(step.weights(step_cells(layer)))
        shape_key = (tuple(x.shape), x.dtype, x.device, len(parts))
        held = self.graphs.get(shape_key)
        if held is None or held[0] != weights_key:
            graph = StepGraph(lambda xs, ps: _run(layer, xs, ps), x, parts, self.capture)
            self.captures += 1
            # the key after the capture: its warm-up packed the weights (step.py's cache), not changed them
            self.graphs[shape_key] = held = (weights_key, graph)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(shape_key)
        return held[1](x, parts)


def _run(layer, x: Tensor, parts: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    state = parts[0] if len(parts) == 1 else layer.State(*parts)
    out, new = step.step_layers(layer, x, state, loops=False)
    return out, [new] if isinstance(new, Tensor) else list(new)


def graphs_of(layer, capture: Capture | None = None) -> StepGraphs:
    """The layer's ``StepGraphs`` (a plain attribute: not a parameter, not pickled), made on first use."""
    graphs = layer.__dict__.get(ATTR)
    if graphs is None:
        # each graph in its own memory pool: graphs sharing one must be replayed in capture order
        graphs = StepGraphs(capture if capture is not None else capture_cuda)
        object.__setattr__(layer, ATTR, graphs)
    return graphs


def step_graphed(layer, x: Tensor, state) -> tuple:
    """The ``step-graph`` route: ``step.step_layers(layer, x, state)``'s result, replayed from a graph."""
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    with torch.inference_mode(False), torch.no_grad():  # buffers usable in and out of inference mode
        out, new = graphs_of(layer).step(layer, x, parts)
    return out, new[0] if len(new) == 1 else layer.State(*new)
