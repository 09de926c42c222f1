"""Activation checkpointing as the parallelize step applies it: the same gradients, blocks really recomputed in
backward, names untouched, nothing recomputed without gradients."""

import copy
import functools

import pytest
import torch

from pyraflow.train.parallelize import checkpoint_activations
from helpers import packed, randomised_model, random_samples, rel_err


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
