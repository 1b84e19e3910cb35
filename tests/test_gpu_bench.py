"""``python -m rnnkit.bench --device cuda``: a clear stop without CUDA; every row group with it."""

from __future__ import annotations

import json

import pytest
import torch

from rnnkit.bench import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_cuda_rows_stop_with_a_message():
    with pytest.raises(SystemExit) as stopped:
        main(["--device", "cuda", "--smoke"])
    assert "no CUDA device is available here" in str(stopped.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_rows_run(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "bench.json"
    main(["--device", "cuda", "--smoke", "--json", str(path)])
    report = json.loads(path.read_text())
    assert {r["group"] for r in report["rows"]} == {"grid", "bf16", "user-cell", "step"}
    routes = {r["group"]: r["route"] for r in report["rows"] if not r["forced"]}
    assert routes["user-cell"] == "triton-loops" and routes["step"] == "step-graph"
    assert all(r["torch_ms"] > 0 and r["rnnkit_ms"] > 0 for r in report["rows"])
