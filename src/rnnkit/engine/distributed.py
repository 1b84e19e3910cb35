"""Processes and devices: torchrun detection, DDP setup, and the few collectives the trainer needs.

Under `torchrun --nproc-per-node N -m rnnkit train ...` the environment carries RANK, WORLD_SIZE and
LOCAL_RANK; we then join a process group (gloo on CPU, NCCL on CUDA). A plain `rnnkit train` is a
world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rnnkit.engine.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int  # this process's index in [0, size)
    size: int  # number of processes (1 without torchrun)
    local_rank: int  # index on this machine; picks the CUDA device
    device: torch.device  # where this process computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_world(device_choice: str) -> World:
    """Join the torchrun process group if there is one; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def teardown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        # every process reaches this point before any closes its connections: a gloo process whose
        # peer tore down first could abort at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few floats over all processes (identity in a world of one)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every process's `obj`, in rank order (trusted, in-job communication only)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world: World) -> Any:
    """Process 0's `obj` on every process."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
