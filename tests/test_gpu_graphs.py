"""The CUDA-graph stepper's bookkeeping (core/cuda_graphs.py), checked on the CPU.

A CUDA graph replays fixed kernels on fixed buffers. Here the capture is replaced by its eager
equivalent with the same contract (``capture_eager``: the step computed from the graph's input
buffers into its output buffers at each replay), so what is checked is the part that is rnnkit's:
copies in and out, one graph per batch size, re-capture when a weight changes, the limit on kept
graphs. The graph itself is checked on CUDA (tests/test_gpu_cuda.py)."""

from __future__ import annotations

import torch

import rnnkit
from rnnkit.core import cuda_graphs, step


def capture_eager(fn):
    out, new = fn()

    def replay():
        got_out, got_new = fn()
        out.copy_(got_out)
        for mine, got in zip(new, got_new):
            mine.copy_(got)

    return replay, (out, new)


def _layer():
    torch.manual_seed(0)
    return rnnkit.LSTM(3, 5, num_layers=2, batch_first=True).eval()


def _state(layer, B):
    return [torch.randn(2, B, 5), torch.randn(2, B, 5)]


def _want(layer, x, parts):
    out, new = step.step_layers(layer, x, layer.State(*parts), loops=False)
    return out, list(new)


@torch.no_grad()
def test_replayed_steps_equal_the_stepper_and_are_copies():
    layer = _layer()
    graphs = cuda_graphs.StepGraphs(capture_eager)
    parts = _state(layer, 2)
    outputs = []
    for _ in range(3):
        x = torch.randn(2, 1, 3)
        out, new = graphs.step(layer, x, parts)
        want_out, want_new = _want(layer, x, parts)
        torch.testing.assert_close(out, want_out)
        for got, want in zip(new, want_new):
            torch.testing.assert_close(got, want)
        outputs.append((out, out.clone()))
        parts = new
    assert graphs.captures == 1
    for returned, seen in outputs:  # a later replay did not overwrite an earlier result
        assert torch.equal(returned, seen)


@torch.no_grad()
def test_one_graph_per_batch_size_and_at_most_max_graphs(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    layer = _layer()
    graphs = cuda_graphs.StepGraphs(capture_eager)
    for B in (1, 2, 1, 2):
        graphs.step(layer, torch.randn(B, 1, 3), _state(layer, B))
    assert graphs.captures == 2
    graphs.step(layer, torch.randn(3, 1, 3), _state(layer, 3))  # batch 1 is the least recently used
    assert [key[0][0] for key in graphs.graphs] == [2, 3]
    graphs.step(layer, torch.randn(1, 1, 3), _state(layer, 1))
    assert graphs.captures == 4


def test_a_changed_weight_is_captured_again():
    layer = _layer()
    graphs = cuda_graphs.StepGraphs(capture_eager)
    x, parts = torch.randn(2, 1, 3), _state(layer, 2)
    with torch.no_grad():
        before, _ = graphs.step(layer, x, parts)
        layer.cells[0].weight_hh.mul_(0.5)  # as an optimizer step writes it
        after, _ = graphs.step(layer, x, parts)
        want, _ = _want(layer, x, parts)
    assert graphs.captures == 2
    torch.testing.assert_close(after, want)
    assert not torch.allclose(before, after)


def test_graphs_are_for_cuda_tensors_only():
    layer = _layer()
    assert cuda_graphs.why_not(layer, torch.randn(1, 1, 3)) == "not a CUDA tensor"
    with torch.no_grad():
        _, state = layer(torch.randn(1, 2, 3))
        assert rnnkit.explain(layer, torch.randn(1, 1, 3), state).name != "step-graph"
