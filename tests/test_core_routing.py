"""The routing table (core/routing.py): one function names the route of any call, every route is
documented, and a route is chosen for a block of code without any module-level switch."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.core import routing
from user_cells import MGUCell


def test_every_route_is_in_the_docstring_table():
    doc = routing.__doc__
    for position, route in enumerate(routing.ROUTES, start=1):
        assert f"{position}. ``{route.name}``" in doc, route.name
    assert routing.ROUTES[-1].name == "reference"  # the specification takes whatever no route before it does


def test_every_route_is_in_the_internals_page():
    page = Path(__file__).resolve().parents[1] / "docs" / "internals.md"
    if not page.is_file():
        pytest.skip("docs/internals.md is not beside the tests")
    text = page.read_text()
    for route in routing.ROUTES:
        assert f"`{route.name}`" in text, route.name


def test_explain_names_the_route_and_runs_nothing():
    layer = rnnkit.GRU(3, 4, num_layers=2, batch_first=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    explanation = rnnkit.explain(layer, x)
    assert explanation.name in routing.ROUTE_NAMES
    assert explanation.route.name == explanation.name and explanation.name in str(explanation)
    assert [name for name, _ in explanation.passed] == [r.name for r in routing.ROUTES][: len(explanation.passed)]
    assert x.grad is None and all(p.grad is None for p in layer.parameters())


def test_a_user_cell_is_never_routed_to_torchs_kernel():
    layer = rnnkit.Recurrent(MGUCell, 3, 4, batch_first=True)
    explanation = rnnkit.explain(layer, torch.randn(2, 5, 3))
    assert explanation.name in ("cpp-compiled", "generic")
    assert dict(explanation.passed)["torch-kernel"] == "not a stack of one built-in cell as shipped"


def test_explain_raises_what_the_call_raises():
    with pytest.raises(ValueError, match="input_size=3"):
        rnnkit.explain(rnnkit.LSTM(3, 4, batch_first=True), torch.randn(2, 5, 7))


def test_force_runs_the_named_route_and_is_scoped():
    layer = rnnkit.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with routing.force("reference") as route:
        assert route.name == "reference" and rnnkit.explain(layer, x).name == "reference"
        seen = []
        thread = threading.Thread(target=lambda: seen.append(rnnkit.explain(layer, x).name))
        thread.start()
        thread.join()
        assert seen[0] != "reference"  # another thread is not inside the block
    assert rnnkit.explain(layer, x).name != "reference"


def test_force_refuses_an_unknown_route_or_one_that_cannot_run_the_call():
    with pytest.raises(ValueError, match="unknown route 'fast'"), routing.force("fast"):
        pass
    layer = rnnkit.Recurrent(MGUCell, 3, 4, batch_first=True)
    with routing.force("torch-kernel"), pytest.raises(ValueError, match="cannot run this call: not a stack"):
        layer(torch.randn(2, 5, 3))
    with routing.force("step-matmul"), pytest.raises(ValueError, match="no state carried"):
        layer(torch.randn(2, 1, 3))


def test_each_call_logs_its_route(caplog):
    layer = rnnkit.RNN(3, 4, batch_first=True)
    with caplog.at_level(logging.DEBUG, logger="rnnkit.routing"):
        layer(torch.randn(2, 5, 3))
    assert any(r.name == "rnnkit.routing" and r.getMessage().startswith("RNN: ") for r in caplog.records)


def test_no_module_level_route_switch_remains():
    from rnnkit.core import scan

    assert not hasattr(scan, "FUSED")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "make",
    [
        lambda: rnnkit.LSTM(6, 8, num_layers=2, batch_first=True),
        lambda: rnnkit.GRU(6, 8, batch_first=True),
        lambda: rnnkit.RNN(6, 8, batch_first=True),
        lambda: rnnkit.Recurrent(MGUCell, 6, 8, batch_first=True),
    ],
)
def test_a_lean_steps_one_pass_agrees_with_the_table(make, batch):
    """choose_route decides a lean step in one pass (it runs at every generated token); explain walks
    the whole table: the two name the same route, so a route added above the step rows is seen by both."""
    layer = make().eval()
    x = torch.randn(batch, 1, 6)
    with torch.inference_mode():
        _, state = layer(torch.randn(batch, 3, 6))
        assert routing.choose_route(layer, x, state) is rnnkit.explain(layer, x, state).route
        assert routing.choose_route(layer, x, state).name in ("step-loops", "step-matmul")
