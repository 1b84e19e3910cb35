"""The benchmark's CUDA rows: ``python -m rnnkit.bench --device cuda``.

Each row times rnnkit against torch.nn in the same process on the same GPU, alternating the two
(``run.compare``: order swapped every repeat, median of the repeats, the middle half of the pairs'
ratios), each call followed by ``torch.cuda.synchronize()`` so that a call's time is its kernels'.
Ratio = torch.nn time / rnnkit time: above 1, rnnkit is faster.

Rows (B=64 and B=1, H=512, T=256, input 512 unless said):

- ``grid``: the LSTM and the GRU, float32, training (forward and backward, the input's gradient
  included) and inference, on the route each call takes (cuDNN's ``torch-kernel``);
- ``bf16``: LSTM training under bf16 autocast, against torch.nn under the same autocast, on the
  default route and through ``triton-loops``; ``vs_float32`` = rnnkit's float32 time / its bf16 time;
- ``user-cell``: an LSTM written from its gates (``combine`` only: the ``triton-loops`` route)
  against torch.nn's cuDNN LSTM, training;
- ``step``: one token at a time through 3 layers of 512 (LSTM and GRU) at batch 1, state carried,
  on the route each call takes (``step-graph``) and through ``step-matmul``, per token.

``--quick`` shortens T to 64 and the repeats; ``--smoke`` runs tiny sizes only to check the rows run.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Callable

import torch

import rnnkit
from rnnkit.bench.run import UserLSTMCell, _infer, compare
from rnnkit.core import routing

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def require_cuda() -> None:
    """Stop with a message where this machine cannot run the CUDA rows."""
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise SystemExit(
            f"python -m rnnkit.bench --device cuda: no CUDA device is available here (torch {torch.__version__}, "
            f"{built}). Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or drop --device cuda."
        )


def _synced(fn: Callable[[], object], route: str | None = None) -> Callable[[], None]:
    def run():
        with routing.force(route) if route else contextlib.nullcontext():
            fn()
        torch.cuda.synchronize()

    return run


def _train(model, x, autocast: bool = False):
    def run():
        for p in model.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, _ = model(x)
        out.float().sum().backward()

    return run


def _steps(model, x, tokens: int):
    """``tokens`` steps of one token from a state made once (the prompt is not timed)."""
    with torch.inference_mode():
        _, first = model(x)

    def run():
        with torch.inference_mode():
            state = first
            for _ in range(tokens):
                _, state = model(x, state)

    return run


def _row(group, what, B, H, T, theirs, ours, repeats, taken: str, route=None, per=1) -> dict:
    """One alternated comparison; ``taken``: the route rnnkit's call takes, ``route``: the one forced."""
    t_torch, t_ours, (q1, q3) = compare(_synced(theirs), _synced(ours, route), repeats)
    return {
        "group": group,
        "what": what,
        "batch": B,
        "hidden": H,
        "steps": T,
        "route": route or taken,
        "forced": route is not None,
        "torch_ms": t_torch / per * 1e3,
        "rnnkit_ms": t_ours / per * 1e3,
        "ratio": t_torch / t_ours,
        "ratio_q1": q1,
        "ratio_q3": q3,
    }


def _route(layer, x, *args) -> str:
    return rnnkit.explain(layer, x, *args).name


def run_cuda(preset: str = "full", log=print) -> dict:
    """Every CUDA row of the preset (``full``, ``quick`` or ``smoke``) as a report dict."""
    require_cuda()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if preset == "smoke":
        I, H, T, batches, repeats, tokens, hidden_step = 8, 16, 4, (1, 2), 1, 2, 16
    elif preset == "quick":
        I, H, T, batches, repeats, tokens, hidden_step = 512, 512, 64, (1, 64), 3, 32, 512
    else:
        I, H, T, batches, repeats, tokens, hidden_step = 512, 512, 256, (1, 64), 5, 64, 512
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        log(
            f"{row['group']:9s} {row['what']:28s} B={row['batch']:<3d} H={row['hidden']} T={row['steps']:<4d} "
            f"torch {row['torch_ms']:8.3f} ms  rnnkit {row['rnnkit_ms']:8.3f} ms  ratio {row['ratio']:.2f} "
            f"[{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}]  route {row['route']}"
        )

    for kind, make in TORCH.items():
        for B in batches:
            theirs = make(I, H, batch_first=True).to(dev)
            ours = rnnkit.from_torch(theirs).to(dev)
            x = torch.randn(B, T, I, device=dev, requires_grad=True)
            with torch.no_grad():
                infer_route = _route(ours, x)
            train = _row(
                "grid", f"{kind} float32 train", B, H, T, _train(theirs, x), _train(ours, x), repeats, _route(ours, x)
            )
            add(train)
            add(
                _row("grid", f"{kind} float32 infer", B, H, T, _infer(theirs, x), _infer(ours, x), repeats, infer_route)
            )

    B = batches[-1]
    theirs = torch.nn.LSTM(I, H, batch_first=True).to(dev)
    ours = rnnkit.from_torch(theirs).to(dev)
    x = torch.randn(B, T, I, device=dev, requires_grad=True)
    float32 = compare(_synced(_train(ours, x)), _synced(_train(ours, x, autocast=True)), repeats)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        default_route = _route(ours, x)
    t_float32 = float32[0] * 1e3
    for forced in (None, "triton-loops"):
        theirs_fn, ours_fn = _train(theirs, x, autocast=True), _train(ours, x, autocast=True)
        row = _row("bf16", "lstm bf16 autocast train", B, H, T, theirs_fn, ours_fn, repeats, default_route, forced)
        add(row | {"rnnkit_float32_ms": t_float32, "vs_float32": t_float32 / row["rnnkit_ms"]})

    user = rnnkit.Recurrent(UserLSTMCell, I, H, batch_first=True).to(dev)
    user.load_state_dict(ours.state_dict())
    add(
        _row(
            "user-cell",
            "user lstm cell vs cudnn train",
            B,
            H,
            T,
            _train(theirs, x),
            _train(user, x),
            repeats,
            _route(user, x),
        )
    )

    for kind, make in TORCH.items():
        theirs = make(hidden_step, hidden_step, num_layers=3, batch_first=True).to(dev).eval()
        ours = rnnkit.from_torch(theirs).to(dev).eval()
        x = torch.randn(1, 1, hidden_step, device=dev)
        with torch.inference_mode():
            route = _route(ours, x, ours(x)[1])
        for forced in (None, "step-matmul"):
            theirs_fn, ours_fn = _steps(theirs, x, tokens), _steps(ours, x, tokens)
            add(
                _row(
                    "step",
                    f"{kind} 3 layers, per token",
                    1,
                    hidden_step,
                    tokens,
                    theirs_fn,
                    ours_fn,
                    repeats,
                    route,
                    forced,
                    tokens,
                )
            )

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "preset": preset,
        "rows": rows,
    }


def format_rows(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}"]
    lines.append("ratio = torch.nn time / rnnkit time (above 1: rnnkit faster), [middle half of the pairs' ratios]")
    for r in report["rows"]:
        extra = f"  bf16 vs rnnkit float32: {r['vs_float32']:.2f}x" if "vs_float32" in r else ""
        lines.append(
            f"{r['group']:9s} {r['what']:30s} B={r['batch']:<3d} T={r['steps']:<4d} {r['ratio']:5.2f} "
            f"[{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] {r['route']}{' (forced)' if r['forced'] else ''}{extra}"
        )
    return "\n".join(lines)


def main_cuda(preset: str, json_path: str | None, route: str | None) -> None:
    """``python -m rnnkit.bench --device cuda``: the rows, a table, and the JSON where asked."""
    require_cuda()
    with routing.force(route) if route else contextlib.nullcontext():
        report = run_cuda(preset, log=lambda line: print(line, flush=True))
    report["forced_route"] = route
    print()
    print(format_rows(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
