"""Activation checkpointing as the parallelize step applies it: the same gradients, blocks really recomputed in
backward, names untouched, nothing recomputed without gradients; the sequence-parallel exchange around attention
against attention over the whole stream."""

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyraflow.train.parallelize import checkpoint_activations
from helpers import check_split_models, packed, randomised_model, random_samples, rel_err


def counted(block, calls: list) -> None:
    """Count calls of the block's own forward (a recomputation calls it again; hooks would not see that)."""
    forward = block.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        calls.append(block)
        return forward(*args, **kwargs)

    block.forward = run


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_checkpointed_blocks_give_the_same_gradients_and_recompute_in_backward(fraction):
    samples = random_samples(11)
    plain = randomised_model(11)
    recomputing = copy.deepcopy(plain)
    calls: list = []
    for block in recomputing.blocks:
        counted(block, calls)
    names = list(recomputing.state_dict())
    chosen = checkpoint_activations(recomputing, fraction)
    assert chosen == round(fraction * len(plain.blocks)) > 0
    assert list(recomputing.state_dict()) == names  # checkpoints and FSDP2 see the same names

    grads = []
    for model in (plain, recomputing):
        model(packed(samples, model)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[1], grads[0]) <= 1e-6
    runs = [sum(c is block for c in calls) for block in recomputing.blocks]
    assert runs == [2] * chosen + [1] * (len(runs) - chosen)  # forward, then once more in backward

    calls.clear()
    with torch.no_grad():
        recomputing(packed(samples, recomputing))
    assert len(calls) == len(recomputing.blocks)


def test_no_fraction_leaves_the_blocks_alone():
    model = randomised_model(12)
    forwards = [block.forward for block in model.blocks]
    assert checkpoint_activations(model, 0.0) == 0
    assert [block.forward for block in model.blocks] == forwards


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["all-gather", "all-to-all"])
def test_sequence_parallel_attention_equals_attention_over_the_whole_stream(tmp_path, path):
    """Two ranks, each with its part of a 37-token stream (19 / 18): forward and backward through the exchange equal
    attention over the whole stream (fp64, 1e-12), on gloo's all-gather path and on NCCL's all-to-all path (its
    collective emulated over gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).with_name("torchrun_sequence.py")), str(tmp_path),
               *(["all-to-all"] if path == "all-to-all" else [])]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["tokens"] for r in reports] == [19, 18]
    assert all(r["forward"] < 1e-12 and r["backward"] < 1e-12 for r in reports), reports


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["all-gather", "all-to-all"])
def test_every_architecture_split_over_two_ranks_computes_what_it_computes_whole(tmp_path, path):
    """mmdit, flux and mmdit-sd3 (4 heads, temporal causal) on a packed batch of all three stages, several frames
    and a video unit with two history parts: the output of the split model (gathered) equals the whole model's and
    the gradients summed over the group equal the whole model's, within 1e-5 of their size (fp32). Each rank keeps
    for backward under 0.6 of the activations (per-run conditioning and the gathered output stay whole on every rank,
    which matters less as width grows; BENCHMARKS.md has the measured share)."""
    check_split_models(tmp_path, ["all-to-all"] if path == "all-to-all" else [])


def test_a_sequence_split_that_does_not_divide_the_heads_names_the_valid_ones():
    from pyraflow.config import check_sequence_heads, load_config

    check_sequence_heads(30, 6)
    with pytest.raises(ValueError, match="does not divide the model's 30 heads; use 3 \\(any of \\[1, 2, 3, 5, 6, 10, 15, 30\\]\\)"):
        check_sequence_heads(30, 4)
    with pytest.raises(ValueError, match="train.sequence_parallel=3 does not divide the model's 4 heads; use 2 \\(any of \\[1, 2, 4\\]\\)"):
        load_config(None, ["model.num_heads=4", "train.sequence_parallel=3"])


def test_runs_within_a_span_are_clipped_and_counted_from_the_first():
    from pyraflow.archs.base import runs_within

    assert runs_within([4, 0, 3, 5], 0, 6) == ([4, 0, 2], 0)
    assert runs_within([4, 0, 3, 5], 6, 12) == ([1, 5], 2)
    assert runs_within([4, 3], 1, 3) == ([2], 0)


def test_sequence_parallel_needs_torchrun_and_a_world_it_divides():
    from pyraflow.train.parallelize import DistributedInfo, join_sequence_groups

    assert join_sequence_groups(DistributedInfo(), 1).sequence_ranks == 1
    with pytest.raises(ValueError, match="needs a world of a multiple of 2 ranks under torchrun"):
        join_sequence_groups(DistributedInfo(), 2)
    with pytest.raises(ValueError, match="this run has 3\\): launch with torchrun --nproc_per_node=2"):
        join_sequence_groups(DistributedInfo(world_size=3, enabled=True), 2)
