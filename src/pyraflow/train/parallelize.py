"""Distributed set-up, kept out of the model: process group under torchrun, then DDP or FSDP2.

Order (as torchtitan): activation checkpointing, then compilation (pyraflow.compilation), then data parallelism.
Every collective the training code uses is defined here.
gloo on CPU (correctness, not speed), NCCL on CUDA.

A run's process group lives inside ``process_group()``: it is destroyed however the run ends (success, an
exception, Ctrl-C), so no rank leaves communication threads running into interpreter exit, and a rank that
fails says so, naming itself, before it leaves (its peers then fail promptly on the broken connection, and
torchrun stops the job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


@dataclass
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # launched by torchrun, with a process group (also with a single rank)
    sequence_ranks: int = 1  # ranks per sequence-parallel group (consecutive ranks; ``join_sequence_groups``)
    sequence_group: object = None  # this rank's sequence-parallel process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's group among the data-parallel replicas: ranks of one sequence-parallel group share a batch."""
        return self.rank // self.sequence_ranks

    @property
    def data_size(self) -> int:
        """The number of batches the world trains on at once (world size / sequence-parallel group size)."""
        return self.world_size // self.sequence_ranks

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence_ranks


def init_distributed(timeout_minutes: float | None = None) -> DistributedInfo:
    """Join the process group torchrun describes in the environment (one rank included, so DDP / FSDP2 run as they
    would on many); a plain process otherwise.

    timeout_minutes: how long a collective may wait for a peer before it fails (None: torch's default)."""
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistributedInfo(device=device)
    world = int(os.environ["WORLD_SIZE"])
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
    return DistributedInfo(rank, world, local, device, enabled=True)


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


def checkpoint_activations(model: torch.nn.Module, fraction: float) -> int:
    """Recompute the activations of the first ``fraction`` of the model's blocks in backward instead of keeping them
    (model.checkpoint_fraction): memory for compute. Each chosen block's forward is replaced in place, as
    compile_blocks does, so parameter and state-dict names stay as they are; without gradients (sampling, the
    history cache) the blocks run as before. Returns the number of blocks checkpointed."""
    blocks = list(model.blocks)
    chosen = blocks[:round(fraction * len(blocks))]
    for block in chosen:
        block.forward = functools.partial(_recomputed, block.forward)
    return len(chosen)


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def parallelize(model: torch.nn.Module, info: DistributedInfo, mode: str, precision: str = "fp32") -> torch.nn.Module:
    """Wrap for data parallelism: ``ddp`` (replicated) or ``fsdp`` (FSDP2 fully_shard per block, then the root).

    Under FSDP in bf16 (as torchtitan): parameters are gathered and computed in bf16, gradients reduced in fp32, and
    the sharded fp32 parameters stay the optimizer's master copy."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
            else MixedPrecisionPolicy()
        # blocks return views (reshaped broadcasts); nothing modifies a block's output in place, which is what
        # FSDP2 warns about on every forward
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"train.parallel={mode!r} must be 'ddp' or 'fsdp'.")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (FSDP2 parameters are DTensors sharded across ranks)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_copies(tensors: list[torch.Tensor], info: DistributedInfo) -> Iterator[torch.Tensor | None]:
    """Full copies of (possibly sharded) tensors, one at a time, on rank 0's CPU (None elsewhere): each is gathered
    when asked for (a collective for a sharded tensor: every rank must ask in the same order) and dropped by the
    other ranks at once, so no rank holds more than one whole tensor besides its shards."""
    for t in tensors:
        full = full_tensor(t)
        yield full.detach().cpu() if info.is_main else None
        del full


def local_rows(target: torch.Tensor) -> slice | None:
    """The rows of the full tensor this rank holds of an FSDP2 parameter (sharded on dim 0 in ``torch.chunk``'s
    pieces); None for a tensor every rank holds whole."""
    if not hasattr(target, "full_tensor"):
        return None
    from torch.distributed.tensor import Shard

    if len(target.placements) != 1 or target.placements[0] != Shard(0):
        raise NotImplementedError(f"only FSDP2's dim-0 sharding is read in slices, not {target.placements}")
    rows, world, rank = target.shape[0], target.device_mesh.size(), target.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return slice(start, min(start + chunk, rows))


@torch.no_grad()
def fill_sharded(targets: dict[str, torch.Tensor], read) -> None:
    """Fill (possibly sharded) tensors from storage, ``read(name, rows)`` giving a stored tensor or its rows: each
    rank reads only the rows it holds, so no rank ever holds the whole model (no collective either)."""
    for name, target in targets.items():
        rows = local_rows(target)
        local = target if rows is None else target.to_local()
        stored = read(name, rows)
        if tuple(stored.shape) != tuple(local.shape):
            raise ValueError(f"stored tensor {name} gives {tuple(stored.shape)} where this rank holds "
                             f"{tuple(local.shape)}; the weights are of another model.")
        local.copy_(stored)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a model whose parameters were built on the meta device (and sharded), keeping its buffers' values
    (they are computed from the config at build time, not stored everywhere)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over every rank, on the device (no host read)."""
    dist.all_reduce(t)
    return t


def main_says(flag: bool, info: DistributedInfo) -> bool:
    """Rank 0's ``flag`` on every rank (a broadcast, which waits for the device)."""
    value = torch.tensor([float(flag)], device=info.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def gather_objects(obj, info: DistributedInfo) -> list | None:
    """Every rank's ``obj`` on rank 0, in rank order (None elsewhere)."""
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier(info: DistributedInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistributedInfo) -> None:
    """Destroy the process group, after collecting the garbage: a sharded model lives in reference cycles (FSDP's
    state and its module point at each other) that hold the group, and left to the interpreter's exit their
    collection would tear down the group's C++ threads while Python finalises, which aborts the process. The caller
    lets go of its trainer first (run_training's body is a function for that)."""
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ----- sequence parallelism (Ulysses): the groups and the exchanges around attention ---------------------------------

def join_sequence_groups(info: DistributedInfo, ranks: int) -> DistributedInfo:
    """Split the world into groups of ``ranks`` consecutive ranks (a 2-D device mesh, data x sequence): each group
    trains on one batch, every rank holding a contiguous part of its tokens. FSDP2 still shards over the whole world
    (parallelize), so weights and optimizer state per GPU fall with the world size, activations with ``ranks``."""
    if ranks == 1:
        return info
    if not info.enabled or info.world_size % ranks:
        raise ValueError(f"train.sequence_parallel={ranks} needs a world of a multiple of {ranks} ranks under torchrun "
                         f"(this run has {info.world_size if info.enabled else 'no torchrun, 1'}): launch with "
                         f"torchrun --nproc_per_node={ranks} (or a multiple), or set train.sequence_parallel=1.")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size // ranks, ranks), mesh_dim_names=("data", "sequence"))
    return dataclasses.replace(info, sequence_ranks=ranks, sequence_group=mesh.get_group("sequence"))


def sequence_shard(info: DistributedInfo):
    """The model's view of its sequence-parallel group (pyraflow.attention.SequenceShard), or None without one."""
    from pyraflow.attention import SequenceShard

    if info.sequence_ranks == 1:
        return None
    group = info.sequence_group
    return SequenceShard(info.sequence_rank, info.sequence_ranks,
                         to_heads=functools.partial(sequence_to_heads, group=group),
                         to_sequence=functools.partial(heads_to_sequence, group=group),
                         gather=functools.partial(gather_sequence, group=group))


def _gather_rows(x: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """Every rank's ``x`` (rank i's with sizes[i] rows), through all_gather (gloo has no all_to_all): each is padded
    to the longest and trimmed after."""
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [part[:size] for part, size in zip(parts, sizes)]


def _sequence_to_heads(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """(this rank's tokens, H, D) -> (every token, H / ranks, D): the heads of this rank, every rank's tokens."""
    ranks, rank = len(sizes), dist.get_rank(group)
    heads = x.shape[1] // ranks
    if dist.get_backend(group) == "gloo":
        return torch.cat(_gather_rows(x, sizes, group))[:, rank * heads : (rank + 1) * heads].contiguous()
    send = x.view(x.shape[0], ranks, heads, x.shape[2]).transpose(0, 1).reshape(ranks * x.shape[0], heads, x.shape[2])
    out = x.new_empty(sum(sizes), heads, x.shape[2])
    dist.all_to_all_single(out, send.contiguous(), output_split_sizes=sizes, input_split_sizes=[x.shape[0]] * ranks,
                           group=group)
    return out


def _heads_to_sequence(y: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """The inverse: (every token, H / ranks, D) -> (this rank's tokens, H, D)."""
    ranks, rank = len(sizes), dist.get_rank(group)
    start = sum(sizes[:rank])
    if dist.get_backend(group) == "gloo":
        return torch.cat(_gather_rows(y, [y.shape[0]] * ranks, group), dim=1)[start : start + sizes[rank]].contiguous()
    local = sizes[rank]
    out = y.new_empty(ranks * local, y.shape[1], y.shape[2])
    dist.all_to_all_single(out, y.contiguous(), output_split_sizes=[local] * ranks, input_split_sizes=sizes,
                           group=group)
    return out.view(ranks, local, y.shape[1], y.shape[2]).transpose(0, 1).reshape(local, ranks * y.shape[1], y.shape[2])


class _Exchange(torch.autograd.Function):
    """One direction of the exchange forward, the other backward (the two are each other's transpose)."""

    @staticmethod
    def forward(ctx, x, sizes, group, to_heads: bool):
        ctx.sizes, ctx.group, ctx.to_heads = sizes, group, to_heads
        return (_sequence_to_heads if to_heads else _heads_to_sequence)(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        inverse = _heads_to_sequence if ctx.to_heads else _sequence_to_heads
        return inverse(grad, ctx.sizes, ctx.group), None, None, None


def sequence_to_heads(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Before attention: this rank's contiguous part of a packed stream (sizes[rank] tokens, H heads) -> every
    token of the stream for this rank's H / ranks heads (all_to_all on NCCL, all_gather on gloo); differentiable,
    its backward is the inverse exchange."""
    return _Exchange.apply(x, list(sizes), group, True)


def heads_to_sequence(y: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """After attention: every token for this rank's heads -> this rank's tokens for every head."""
    return _Exchange.apply(y, list(sizes), group, False)


class _GatherSequence(torch.autograd.Function):
    """Every rank's rows, whole; backward keeps this rank's rows of the gradient (see ``gather_sequence``)."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        rank = dist.get_rank(group)
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return torch.cat(_gather_rows(x, sizes, group))

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows], None, None


def gather_sequence(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """The model's output rows of every rank of the group, in stream order. Every rank then computes the same loss from
    the same whole output, so the gradient of this rank's rows is its own slice (no reduction needed); the trainer
    scales the loss by the group size because data parallelism averages gradients over every rank of the world."""
    return _GatherSequence.apply(x, list(sizes), group)
