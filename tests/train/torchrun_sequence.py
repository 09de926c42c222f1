"""Test scaffolding, run under torchrun: sequence-parallel attention (each rank holds a contiguous part of a packed
stream, the exchange gives it every token for its share of the heads, attention, the inverse exchange) against
attention over the whole stream on one rank, forward and backward; every rank writes its largest differences.

    torchrun --nproc_per_node=2 tests/train/torchrun_sequence.py OUT [all-to-all]

With ``all-to-all`` the group is treated as NCCL's (the all_to_all path) and all_to_all_single is emulated over
gloo, so the path a GPU takes is checked on the CPU too.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pyraflow.train.parallelize as parallelize
from pyraflow.train.parallelize import heads_to_sequence, process_group, sequence_to_heads


def emulated_all_to_all(out, send, output_split_sizes, input_split_sizes, group=None):
    """all_to_all_single's contract over gloo: rank r receives, from every rank i in order, the r-th piece of i's
    input (pieces cut by i's input_split_sizes)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    splits = [None] * world
    dist.all_gather_object(splits, list(input_split_sizes), group=group)
    inputs = parallelize._gather_rows(send, [sum(s) for s in splits], group)
    pieces = [inputs[i].split(splits[i])[rank] for i in range(world)]
    assert [len(p) for p in pieces] == list(output_split_sizes)
    out.copy_(torch.cat(pieces))


def attention(q, k, v):  # (N, H, D) each, every token attending to every token
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["all-to-all"]:
        dist.get_backend = lambda group=None: "nccl"
        dist.all_to_all_single = emulated_all_to_all
    with process_group() as info:
        tokens, heads, dim = 37, 4, 8  # 37 tokens: parts of 19 and 18
        g = torch.Generator().manual_seed(0)
        q, k, v, w = (torch.randn(tokens, heads, dim, generator=g, dtype=torch.float64) for _ in range(4))
        sizes = [len(part) for part in torch.arange(tokens).tensor_split(info.world_size)]
        start = sum(sizes[: info.rank])
        mine = slice(start, start + sizes[info.rank])
        whole = [t.clone().requires_grad_(True) for t in (q, k, v)]
        expected = attention(*whole)
        (expected * w).sum().backward()
        local = [t[mine].clone().requires_grad_(True) for t in (q, k, v)]
        result = heads_to_sequence(attention(*(sequence_to_heads(t, sizes) for t in local)), sizes)
        (result * w[mine]).sum().backward()
        report = {"forward": (result - expected[mine]).abs().max().item(),
                  "backward": max((a.grad - b.grad[mine]).abs().max().item() for a, b in zip(local, whole)),
                  "tokens": sizes[info.rank]}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{info.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
