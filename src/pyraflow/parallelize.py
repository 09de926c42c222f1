"""Distributed set-up, kept out of the model: process group under torchrun, then DDP or FSDP2.

Order (as torchtitan): activation checkpointing is a model option; data parallelism wraps last.
gloo on CPU (correctness, not speed), NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def init_distributed() -> DistributedInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
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
        dist.init_process_group(backend=backend)
    return DistributedInfo(rank, world, local, device)


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (FSDP2 parameters are DTensors sharded across ranks)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def barrier(info: DistributedInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistributedInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
