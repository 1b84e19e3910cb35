"""Checkpoints: one safetensors file per checkpoint, written atomically, loaded without pickle.

A checkpoint is a single `.safetensors` file. Its tensors are named by prefix:

    model.<param>            the model's state_dict
    optim.<index>.<key>      tensor entries of the optimizer state (exp_avg, momentum_buffer, ...)
    rank<r>.rng.<name>       each process's torch RNG states (uint8 tensors)
    rank<r>.task.<name>      each process's task tensor state (e.g. lm's carried hidden state)

and its safetensors header metadata holds `format` = FORMAT and `state` = a JSON document with
everything else (step, optimizer hyper-parameters, Python/NumPy RNG states, data position, best
metric). Loading parses a JSON header and raw tensor bytes only: a checkpoint from a stranger cannot
execute code. Because everything is one file, atomicity is the classic sequence: write a temporary
file in the same directory, fsync it, `os.replace` it over the old one, fsync the directory. A crash
or `kill -9` at any moment leaves either the old or the new checkpoint, both complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rnnkit.common.files import atomic_write
from rnnkit.engine.errors import CheckpointError

FORMAT = "rnnkit-checkpoint/1"  # bumped when the layout changes incompatibly


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write tensors + JSON `state` to `path` atomically."""
    # Cloned, contiguous CPU copies: safetensors refuses shared storage (tied weights) and views.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "state": json.dumps(state)}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def _open(path: Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        metadata = handle.metadata() or {}
    except Exception as e:  # safetensors raises several types for bad headers / truncation
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was not written by rnnkit (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        state = json.loads(metadata["state"])
    except (KeyError, ValueError):
        raise CheckpointError(f"checkpoint {path} has a damaged state header") from None
    return handle, state


def load_checkpoint(path: Path, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors whose name starts with `prefix`, JSON state). safetensors checks the header's offsets
    against the file size when opening, so a truncated file fails here, never later."""
    handle, state = _open(path)
    try:
        # safetensors' handle has keys() but is not iterable itself
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__})") from None
    return tensors, state


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_model_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the `model.` tensors of checkpoint `path` into `model`; returns the JSON state."""
    tensors, state = load_checkpoint(path, prefix="model.")
    weights = strip_prefix(tensors, "model.")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"checkpoint {path} does not match this run's model: {first}") from None
    return state


# ---- optimizer state <-> (tensors, JSON) ---------------------------------------------------------
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():  # names as "<index>.<key>" (the "optim." prefix stripped)
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples into lists; optimizers expect e.g. betas as a tuple
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not match ({e})") from None
