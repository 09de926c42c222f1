"""Stage mix and token-budget batching: budgets, mix tracking, ranks, state."""

import numpy as np
import pytest

from pyraflow.batching import AdaptiveMix, MixSchedule, TokenBudgetBatcher, build_mix
from pyraflow.config import BatchingConfig, MixConfig, resolve_ratio

MNIST_TOKENS = [16 + 16, 64 + 16, 256 + 16]  # 32x32 pixels, patch 2, 16 text tokens


def batcher(ratio="25-50-25", tokens=MNIST_TOKENS, budget=2048, size=4500, rank=0, world=1, **kw):
    mix_kw = kw.pop("mix", {"ratio": ratio})
    config = BatchingConfig(token_budget=budget, mix=MixConfig(**mix_kw), **kw)
    return TokenBudgetBatcher(config, tokens, build_mix(config.mix, len(tokens)), size, rank, world)


def run(b: TokenBudgetBatcher, steps: int):
    return [b.next_batch() for _ in range(steps)]


@pytest.mark.parametrize(
    "ratio, tokens",
    [
        ("25-50-25", MNIST_TOKENS),
        ("uniform", MNIST_TOKENS),
        ("uniform", [4 + 16, 16 + 16, 64 + 16, 256 + 16, 1024 + 16]),  # 5-stage pyramid
        ([0.1, 0.15, 0.2, 0.25, 0.3], [4 + 16, 16 + 16, 64 + 16, 256 + 16, 1024 + 16]),
    ],
)
def test_tokens_stay_steady_and_the_mix_tracks_its_target(ratio, tokens):
    budget = 4 * max(tokens)
    batches = run(batcher(ratio, tokens, budget=budget), 2000)
    per_step = np.array([b.tokens for b in batches])
    assert per_step.std() / per_step.mean() <= 0.02
    assert per_step.max() <= budget
    counts = np.array([b.counts for b in batches]).sum(0)
    target = resolve_ratio(ratio, len(tokens))
    assert np.abs(counts / counts.sum() - target).max() <= 0.005


def test_error_does_not_grow_with_time():
    b = batcher([0.3, 0.3, 0.4])
    target = np.array([0.3, 0.3, 0.4])
    total = np.zeros(3)
    worst = 0.0
    for _ in range(3000):
        total += b.next_batch().counts
        worst = max(worst, np.abs(total - target * total.sum()).max())
    assert worst < 3.0  # samples behind or ahead, at any step, after thousands of samples


def test_linear_schedule_is_followed_step_by_step():
    points = [{"step": 0, "ratio": [0.6, 0.3, 0.1]}, {"step": 1000, "ratio": "25-50-25"}]
    b = batcher(mix={"kind": "linear", "points": points})
    mix = MixSchedule(MixConfig(kind="linear", points=points), 3)
    owed = np.zeros(3)
    for step in range(1500):
        batch = b.next_batch()
        owed += mix.ratio(step) * sum(batch.counts) - np.array(batch.counts)
        assert np.abs(owed).max() < 3.0, step  # cumulative realised counts stay within 3 samples of the schedule
    np.testing.assert_allclose(mix.ratio(500), [0.425, 0.4, 0.175])
    np.testing.assert_allclose(mix.ratio(5000), [0.25, 0.5, 0.25])


def test_piecewise_schedule_switches_at_until():
    mix = MixSchedule(
        MixConfig(kind="piecewise", points=[{"ratio": "uniform", "until": 100}, {"ratio": "25-50-25"}]), 3
    )
    np.testing.assert_allclose(mix.ratio(99), [1 / 3] * 3)
    np.testing.assert_allclose(mix.ratio(100), [0.25, 0.5, 0.25])


def test_two_ranks_get_equal_tokens_and_disjoint_samples():
    size = 1001  # not divisible by 2: one sample per epoch sits out, a different one each epoch
    ranks = [batcher(size=size, rank=r, world=2) for r in range(2)]
    streams = [[], []]
    for _ in range(300):  # about 5 epochs, so several steps straddle an epoch boundary
        b0, b1 = ranks[0].next_batch(), ranks[1].next_batch()
        assert b0.tokens == b1.tokens and b0.counts == b1.counts
        assert not set(b0.sample_ids) & set(b1.sample_ids)
        assert len(set(b0.sample_ids)) == len(b0.sample_ids)
        streams[0] += b0.sample_ids
        streams[1] += b1.sample_ids
    assert ranks[0].epoch() >= 4
    for epoch in range(4):
        shards = [set(stream[epoch * 500 : (epoch + 1) * 500]) for stream in streams]
        assert len(shards[0]) == len(shards[1]) == 500, "a sample repeated within a rank's epoch"
        assert not shards[0] & shards[1]


def test_each_sample_of_an_epoch_is_used_once():
    b = batcher(size=300)
    ids = []
    while b.epoch() < 3:
        ids += b.next_batch().sample_ids
    for e in range(3):
        assert sorted(ids[e * 300 : (e + 1) * 300]) == list(range(300))
    assert ids[:300] != ids[300:600]  # a fresh permutation each epoch


def test_state_restored_at_step_500_reproduces_steps_501_to_1000():
    points = [{"step": 0, "ratio": "uniform"}, {"step": 800, "ratio": "25-50-25"}]
    original = batcher(mix={"kind": "linear", "points": points}, size=777, seed=3)
    run(original, 500)
    state = original.state_dict()
    expected = run(original, 500)
    restored = batcher(mix={"kind": "linear", "points": points}, size=777, seed=3)
    restored.load_state_dict(state)
    assert run(restored, 500) == expected


def test_batch_multiple_and_max_samples_are_respected():
    batches = run(batcher(batch_multiple=4, max_samples=12), 200)
    for b in batches:
        assert len(b.sample_ids) % 4 == 0 and len(b.sample_ids) <= 12
        assert b.tokens <= 2048


def test_ratio_in_tokens_tracks_token_shares():
    batches = run(batcher("uniform", ratio_unit="tokens"), 2000)
    tokens = np.array([b.counts for b in batches]).sum(0) * np.array(MNIST_TOKENS)
    np.testing.assert_allclose(tokens / tokens.sum(), [1 / 3] * 3, atol=0.005)


def test_attention_cost_counts_long_segments_for_more():
    plain = run(batcher(), 100)
    weighted = run(batcher(attention_cost=1 / 1536), 100)
    assert np.mean([b.tokens for b in weighted]) < np.mean([b.tokens for b in plain])
    assert max(b.cost for b in weighted) <= 2048


def test_a_batch_costs_the_sum_of_its_samples_tokens_plus_their_attention_term():
    a = 1 / 1536
    for b in run(batcher(attention_cost=a), 50):
        lengths = [MNIST_TOKENS[c] for c in b.classes]  # one entry per sample
        assert len(b.sample_ids) == len(lengths) and b.counts == [b.classes.count(k) for k in range(3)]
        assert b.tokens == sum(lengths)
        assert b.cost == pytest.approx(sum(length + a * length**2 for length in lengths), rel=1e-12)
        assert b.cost <= 2048


def test_adaptive_mix_favours_the_stage_that_stops_improving():
    mix = AdaptiveMix(MixConfig(kind="adaptive", ratio="uniform", adaptive_every=10, adaptive_rate=0.2,
                                adaptive_min=0.1, adaptive_max=0.6), 3)
    for step in range(1, 2001):
        # stages 0 and 1 keep improving, stage 2 is stuck
        mix.observe(step, {0: 1.0 / step**0.5, 1: 1.0 / step**0.5, 2: 1.0})
    r = mix.ratio(2000)
    assert r[2] > 0.4 and r.sum() == pytest.approx(1.0)
    assert (r >= 0.1 - 1e-9).all() and (r <= 0.6 + 1e-9).all()
    clone = AdaptiveMix(mix.config, 3)
    clone.load_state_dict(mix.state_dict())
    for step in (0, 15, 500, 2000, 2010):
        np.testing.assert_array_equal(clone.ratio(step), mix.ratio(step))


def test_an_adaptive_update_applies_a_fixed_delay_after_the_losses_it_reads():
    """So a batch planned ahead by the loader gets the same ratio however far ahead it was planned."""
    mix = AdaptiveMix(MixConfig(kind="adaptive", ratio="uniform", adaptive_every=10, adaptive_rate=0.5), 3)
    start = mix.ratio(0).copy()
    for step in range(1, 11):
        mix.observe(step, {0: 1.0, 1: 1.0, 2: 2.0 if step < 5 else 2.0 + step})  # stage 2 worsening
    assert not np.array_equal(mix.current, start)  # the update exists ...
    for batch in range(20):
        np.testing.assert_array_equal(mix.ratio(batch), start)  # ... and applies from batch 10 + 10 on
    np.testing.assert_array_equal(mix.ratio(20), mix.current)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 100}, "below one sample of stage 2"),
        ({"ratio": [0.5, 0.5]}, "has 2 entries"),
        ({"ratio": [0.5, 0.6, 0.1]}, "sum to 1"),
        ({"ratio": [-0.5, 1.0, 0.5]}, "negative"),
        ({"ratio": "20-60-20"}, "not a preset"),
        ({"size": 0}, "needs data"),
    ],
)
def test_impossible_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        batcher(**kwargs)


def test_a_budget_too_small_for_an_unused_stage_is_fine():
    b = batcher(ratio=[0.5, 0.5, 0.0], budget=200)
    assert all(b.counts[2] == 0 for b in run(b, 20))
