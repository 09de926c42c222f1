"""Distributed set-up, kept out of the model: process group under torchrun, then DDP or FSDP2.

Order (as torchtitan): activation checkpointing is a model option; data parallelism wraps last.
gloo on CPU (correctness, not speed), NCCL on CUDA.

A run's process group lives inside ``process_group()``: it is destroyed however the run ends (success, an
exception, Ctrl-C), so no rank leaves communication threads running into interpreter exit, and a rank that
fails says so, naming itself, before it leaves (its peers then fail promptly on the broken connection, and
torchrun stops the job).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float | None = None) -> DistributedInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise.

    timeout_minutes: how long a collective may wait for a peer before it fails (None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistributedInfo(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistributedInfo(rank, world, local, device)


@contextlib.contextmanager
def process_group(timeout_minutes: float | None = None) -> Iterator[DistributedInfo]:
    """The process group of one run (nothing to do in a single process), torn down however the run ends."""
    info = init_distributed(timeout_minutes)
    try:
        yield info
    except BaseException as err:
        if info.enabled:
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
            print(f"pyraflow: rank {info.rank} of {info.world_size} failed: {reason}", file=sys.stderr, flush=True)
        raise
    finally:
        shutdown(info)


def parallelize(model: torch.nn.Module, info: DistributedInfo, mode: str) -> torch.nn.Module:
    """Wrap for data parallelism: ``ddp`` (replicated) or ``fsdp`` (FSDP2 fully_shard per block, then root)."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel={mode!r} must be 'ddp' or 'fsdp'.")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (FSDP2 parameters are DTensors sharded across ranks)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def barrier(info: DistributedInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistributedInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
