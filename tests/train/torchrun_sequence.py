"""Test scaffolding, run under torchrun: sequence-parallel attention (each rank holds a contiguous part of a packed
stream, the exchange gives it every token for its share of the heads, attention, the inverse exchange) against
attention over the whole stream on one rank, forward and backward; every rank writes its largest differences.

    torchrun --nproc_per_node=2 tests/train/torchrun_sequence.py OUT [all-to-all] [models]

With ``all-to-all`` the group is treated as NCCL's (the all_to_all path) and all_to_all_single is emulated over
gloo, so the path a GPU takes is checked on the CPU too. With ``models``, every architecture runs a packed batch of
several stages and a video unit with its history, once whole on each rank and once split over the group (the
model's ``sequence_shard``): outputs, and gradients summed over the group, are compared in fp32 (on the ranks' GPUs
with NCCL's all_to_all where torchrun gives each rank one).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pyraflow.train.parallelize as parallelize
from pyraflow.train.parallelize import (DistributedInfo, heads_to_sequence, join_sequence_groups, process_group,
                                        sequence_shard, sequence_to_heads)

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' helpers


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


def split_models(info: DistributedInfo) -> dict:
    """Each architecture, whole and split over the group: the largest output difference and the largest gradient
    difference relative to the gradient's size, per architecture."""
    from helpers import CHANNELS, POOLED_DIM, TEXT_DIM, random_samples, tiny_config
    from pyraflow.archs import build_model
    from pyraflow.packing import HistoryPart, Sample, pack

    configs = {"mmdit": tiny_config(width=48, num_heads=4, temporal_causal=True),
               "flux": tiny_config(arch="flux", width=64, depth=1, single_depth=1, num_heads=4, temporal_causal=True),
               "mmdit-sd3": tiny_config(arch="mmdit-sd3", width=64, depth=2, num_heads=4, temporal_causal=True)}
    g = torch.Generator().manual_seed(7)
    history = [HistoryPart(stage, torch.randn(CHANNELS, 1, side, side, generator=g), 250.0, unit, unit)
               for stage, side, unit in ((0, 4, 0), (1, 8, 1))]  # compressed: one stage coarser per unit back
    video_unit = Sample(2, torch.randn(CHANNELS, 2, 16, 16, generator=g), torch.randn(5, TEXT_DIM, generator=g),
                        torch.randn(POOLED_DIM, generator=g), 400.0, history, first_frame=2, unit=2)
    samples = random_samples(3, count=6, frames=(1, 2), per_frame=True) + [video_unit]
    shard = sequence_shard(info)
    report = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = build_model(config)
        with torch.no_grad():
            for p in model.parameters():  # every weight random (the real init zeroes gates, which would hide bugs)
                p.normal_(0, 0.08, generator=g)
        model.to(info.device)
        batch = pack(samples, 3, config.patch_size, config.in_channels, config.text_dim, config.pooled_dim)
        weight = torch.randn(batch.visual.shape[0], batch.visual.shape[1], generator=g).to(info.device)
        batch = batch.to(info.device)
        results, saved = [], []
        for split in (None, shard):
            model.sequence_shard = split
            model.zero_grad()
            # activations autograd keeps for backward, by storage (a tensor saved twice counts once; weights apart)
            kept: dict[int, int] = {}
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

            def keep(t):
                if t.untyped_storage().data_ptr() not in weights:
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                out = model(batch)
            saved.append(sum(kept.values()))
            (out * weight).sum().backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            if split is not None:
                dist.all_reduce(grads, group=info.sequence_group)  # each rank holds its tokens' part
            results.append((out.detach(), grads))
        (whole, g_whole), (parts, g_parts) = results
        report[name] = {"forward": (parts - whole).abs().max().item() / whole.abs().max().item(),
                        "backward": ((g_parts - g_whole).abs().max() / g_whole.abs().max()).item(),
                        "tokens": batch.layout.num_visual, "history": sum(batch.layout.history_lengths),
                        "saved_ratio": saved[1] / saved[0]}
    return report


def main() -> None:
    out = Path(sys.argv[1])
    if "all-to-all" in sys.argv[2:]:
        dist.get_backend = lambda group=None: "nccl"
        dist.all_to_all_single = emulated_all_to_all
    with process_group() as info:
        if "models" in sys.argv[2:]:
            report = split_models(join_sequence_groups(info, info.world_size))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{info.rank}.json").write_text(json.dumps(report))
            return
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
