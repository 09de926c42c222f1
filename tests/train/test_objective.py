"""The objective: counter-based random state per (rank, batch), examples carrying their targets, and the loss
against an independent per-sample computation."""

from dataclasses import replace

import torch

from pyraflow.batching import example_classes
from pyraflow.config import load_config
from pyraflow.data.loader import BatchPlan
from pyraflow.packing import HistoryPart, pack, unpack
from pyraflow.schedule import PyramidSchedule
from pyraflow.train.objective import ExampleBuilder, batch_generator, flow_matching_loss
from helpers import CHANNELS, random_samples


def test_batch_generators_differ_across_ranks_and_batches_and_repeat_exactly():
    draw = lambda seed, rank, index: torch.randn(8, generator=batch_generator(seed, rank, index))  # noqa: E731
    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    for other in ((0, 0, 5), (0, 1, 6), (1, 1, 5)):
        assert not torch.allclose(draw(0, 1, 5), draw(*other))


def builder_and_plan(rank: int, index: int = 3):
    config = load_config(None, ["model.patch_size=2", "train.text_dropout=0.5"])
    classes = example_classes(config)
    g = torch.Generator().manual_seed(0)
    null = (torch.zeros(2, 384), torch.zeros(384))
    builder = ExampleBuilder(config, PyramidSchedule(config.schedule), classes, null, rank=rank)
    plan = BatchPlan(list(range(6)), index, [0, 1, 1, 2, 2, 0], {})
    clean = torch.randn(6, 1, 1, 32, 32, generator=g)
    captions = [(torch.randn(5, 384, generator=g), torch.randn(384, generator=g)) for _ in range(6)]
    return builder, plan, clean, captions


def test_a_planned_batch_builds_the_same_on_any_process_and_differently_on_another_rank():
    builder, plan, clean, captions = builder_and_plan(rank=0)
    a, tokens = builder(plan, list(clean.clone()), captions)
    b, _ = builder(plan, list(clean.clone()), captions)
    assert torch.equal(a.visual, b.visual) and torch.equal(a.target, b.target) and torch.equal(a.text, b.text)
    assert tokens == a.layout.num_visual + a.layout.num_text
    other, _ = builder_and_plan(rank=1)[0](plan, list(clean.clone()), captions)
    assert not torch.equal(a.visual, other.visual)
    assert sorted(a.layout.stages) == [0, 0, 1, 1, 2, 2]


def test_the_loss_is_the_mean_over_samples_of_each_samples_mse_on_its_predicted_tokens():
    g = torch.Generator().manual_seed(1)
    samples = random_samples(2, count=6, frames=(1, 2))
    for s in samples:
        s.target = torch.randn(s.latent.shape, generator=g)
    batch = pack(samples, num_stages=3)
    velocity = torch.randn(batch.layout.num_visual, CHANNELS * 4, generator=g)
    loss, per_sample = flow_matching_loss(velocity, batch)
    predicted = unpack(velocity, batch.layout)  # caller's order
    expected = torch.stack([(v - s.target).square().mean() for v, s in zip(predicted, samples)])
    order = batch.layout.order  # per_sample comes in packed order
    torch.testing.assert_close(per_sample, expected[order])
    torch.testing.assert_close(loss, expected.mean())


def test_history_tokens_carry_no_loss():
    """The loss against each sample's MSE computed from the samples alone; the model's output is laid out by packing
    the predictions themselves, with history tokens that would dominate the loss if they were counted."""
    g = torch.Generator().manual_seed(4)
    samples = random_samples(4, count=6, frames=(2,))
    for i, s in enumerate(samples):
        if i % 2 == 0:  # every other sample continues 1 or 2 earlier frames
            frames = 1 + i % 4 // 2
            s.history = [HistoryPart(stage=0, latent=torch.randn(CHANNELS, frames, 4, 4, generator=g), timestep=0.0,
                                     first_frame=0, unit=None)]
            s.first_frame = frames
        s.target = torch.randn(s.latent.shape, generator=g)
    predictions = [torch.randn(s.latent.shape, generator=g) for s in samples]
    batch = pack(samples, num_stages=3)
    as_output = pack([replace(s, latent=p, history=[replace(h, latent=torch.full_like(h.latent, 1e3)) for h in s.history])
                      for s, p in zip(samples, predictions)], num_stages=3)
    assert as_output.layout.num_visual > batch.predicted.numel()  # history tokens are in the output
    loss, per_sample = flow_matching_loss(as_output.visual, batch)
    expected = torch.stack([(p - s.target).square().mean() for p, s in zip(predictions, samples)])
    torch.testing.assert_close(per_sample, expected[batch.layout.order])
    torch.testing.assert_close(loss, expected.mean())
