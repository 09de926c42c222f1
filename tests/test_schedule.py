"""The schedule against independent computations of the same math."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyraflow.schedule import PyramidSchedule, ScheduleConfig, block_noise


def schedule(**kw) -> PyramidSchedule:
    return PyramidSchedule(ScheduleConfig(**kw))


def test_default_three_stage_windows_in_progress_axis():
    s = schedule()
    windows = [(1 - st.sigma_start, 1 - st.sigma_end) for st in s.stages]
    expected = [(0, 1 / 3), (1 / 5, 2 / 3), (1 / 2, 1)]
    np.testing.assert_allclose(windows, expected, atol=1e-12)
    assert [st.downsample for st in s.stages] == [4, 2, 1]


def _expected_start(previous_end: float, gamma: float) -> float:
    # Independent derivation: after Up + renoise, signal a*c and noise std a*(1-c)*sqrt(1+1/gamma)
    # must sum to 1 (a point on the straight path); the start sigma is the noise share.
    c = 1 - previous_end
    noise = (1 - c) * math.sqrt(1 + 1 / gamma)
    return noise / (noise + c)


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("gamma", [0.1, 0.25, 1 / 3])
def test_other_stage_counts_and_gammas_follow_the_formula(stages, gamma):
    s = schedule(stages=stages, gamma=gamma)
    for k, st in enumerate(s.stages):
        assert st.sigma_end == pytest.approx(0.0 if k == stages - 1 else 1 - (k + 1) / stages, abs=1e-12)
        expected = 1.0 if k == 0 else _expected_start(s.stages[k - 1].sigma_end, gamma)
        assert st.sigma_start == pytest.approx(expected, abs=1e-12)
        assert st.downsample == 2 ** (stages - 1 - k)
    # Windows tile 1000 -> 0 without overlap, each sized by the stage's sigma distance.
    distance = np.array([st.sigma_start - st.sigma_end for st in s.stages])
    widths = np.array([st.timestep_window[0] - st.timestep_window[1] for st in s.stages])
    np.testing.assert_allclose(widths, 1000 * distance / distance.sum(), atol=1e-9)
    assert s.stages[0].timestep_window[0] == pytest.approx(1000)
    assert s.stages[-1].timestep_window[1] == pytest.approx(0, abs=1e-9)
    for a, b in zip(s.stages, s.stages[1:]):
        assert a.timestep_window[1] == pytest.approx(b.timestep_window[0])


def test_custom_boundaries_and_shift_warp_the_stage_ends():
    s = schedule(boundaries=[0, 0.5, 0.8, 1.0], shift=3.0)
    shifted = [3 * x / (1 + 2 * x) for x in (0.5, 0.2)]
    assert [st.sigma_end for st in s.stages] == pytest.approx(shifted + [0.0])


def test_timestep_map_covers_each_window_and_identifies_the_stage():
    s = schedule()
    stage = torch.tensor([0, 1, 2, 0, 1, 2])
    r = torch.tensor([1.0, 1.0, 1.0, 1e-6, 1e-6, 1e-6], dtype=torch.float64)
    t = s.timestep(stage, r)
    for k in range(3):
        t_max, t_min = s.stages[k].timestep_window
        assert t[k].item() == pytest.approx(t_max)
        assert t[k + 3].item() == pytest.approx(t_min, abs=1e-2)
    # Any r in (0, 1] of stage k lands strictly inside (t_min, t_max]: disjoint windows.
    r = torch.rand(1000, dtype=torch.float64).clamp(min=1e-9)
    for k in range(3):
        tk = s.timestep(torch.full((1000,), k), r)
        t_max, t_min = s.stages[k].timestep_window
        assert ((tk > t_min) & (tk <= t_max)).all()


def _reference_numbers(n=1000, bounds=(0, 1 / 3, 2 / 3, 1), gamma=1 / 3):
    """Pyramid Flow's scheduler, re-derived in numpy: float32 table sigma_i = (n - i)/n, int() grid
    positions, corrected starts, windows read back from the table."""
    table = (np.arange(n, 0, -1, dtype=np.float32) / np.float32(n)).astype(np.float32)
    starts, ends = [], []
    for k in range(len(bounds) - 1):
        start = float(table[int(bounds[k] * n)])
        e_idx = int(bounds[k + 1] * n)
        end = float(table[e_idx]) if e_idx < n else 0.0
        if k:
            signal = 1 - start
            start = 1 - signal / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)
        starts.append(start)
        ends.append(end)
    d = np.array(starts) - np.array(ends)
    cum = np.concatenate([[0], np.cumsum(d) / d.sum()])
    cum[-1] = 1.0
    t = table * n
    windows = [(float(t[int(cum[k] * n)]), float(t[min(int(cum[k + 1] * n), n - 1)])) for k in range(len(d))]
    return starts, ends, windows


def test_pyramid_flow_preset_reproduces_the_reference_grid():
    s = schedule(preset="pyramid-flow")
    starts, ends, windows = _reference_numbers()
    assert [st.sigma_start for st in s.stages] == pytest.approx(starts, abs=1e-12)
    assert [st.sigma_end for st in s.stages] == pytest.approx(ends, abs=1e-12)
    assert [st.timestep_window for st in s.stages] == [(1000.0, 744.0), (744.0, 386.0), (386.0, 1.0)]
    assert [tuple(w) for w in windows] == [st.timestep_window for st in s.stages]
    assert s.stages[0].sigma_end == pytest.approx(0.667, abs=1e-6)  # table entry 333, not 2/3
    # r is drawn on the 1000-step grid {1, 0.999, ..., 0.001}
    r = s.sample_r(10_000, torch.Generator().manual_seed(0))
    steps = (1 - r) * 1000
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert r.max() <= 1.0 and r.min() >= 0.001 - 1e-7
    grid = s.sampling_grid(5)
    assert grid.tolist() == pytest.approx([1.0, 0.75025, 0.5005, 0.25075, 0.001, 0.0])


def test_pyramid_flow_preset_with_other_stage_counts():
    bounds = (0, 0.25, 0.5, 0.75, 1.0)
    s = schedule(preset="pyramid-flow", stages=4, gamma=0.25)
    starts, ends, windows = _reference_numbers(bounds=bounds, gamma=0.25)
    assert [st.sigma_start for st in s.stages] == pytest.approx(starts, abs=1e-12)
    assert [st.timestep_window for st in s.stages] == [tuple(w) for w in windows]


def test_noise_pyramid_keeps_unit_variance_at_every_level():
    s = schedule(stages=4)
    noise = torch.randn(64, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    for level in s.noise_pyramid(noise):
        assert level.var().item() == pytest.approx(1.0, abs=0.03)
        assert level.mean().item() == pytest.approx(0.0, abs=0.03)
    assert [lvl.shape[-1] for lvl in s.noise_pyramid(noise)] == [4, 8, 16, 32]


def test_block_noise_covariance_matches_its_formula():
    gamma = 1 / 3
    n = block_noise((200_000, 2, 2), gamma, torch.Generator().manual_seed(2), torch.float64)
    flat = n.reshape(-1, 4)
    cov = torch.cov(flat.T)
    expected = (1 + gamma) * torch.eye(4, dtype=torch.float64) - gamma * torch.ones(4, 4, dtype=torch.float64)
    torch.testing.assert_close(cov, expected, atol=0.015, rtol=0)
    # Works per frame on video-shaped tensors and keeps neighbouring blocks independent.
    video = block_noise((20_000, 1, 2, 2, 4), 0.2, torch.Generator().manual_seed(3), torch.float64)
    left, right = video[..., 0:2].reshape(-1, 4), video[..., 2:4].reshape(-1, 4)
    cross = (left.T @ right) / left.shape[0]
    assert cross.abs().max() < 0.03
    assert torch.cov(left.T)[0, 1].item() == pytest.approx(-0.2, abs=0.03)


@pytest.mark.parametrize("next_stage", [1, 2])
def test_jump_gives_iid_unit_noise_and_the_next_stage_signal_level(next_stage):
    s = schedule()
    e = s.stages[next_stage - 1].sigma_end
    s_next = s.stages[next_stage].sigma_start
    draws, size = 40_000, 4
    g = torch.Generator().manual_seed(4)
    # Noise part: end point of the previous stage with zero signal, e * n', then jump.
    coarse_noise = torch.randn(draws, 1, size, size, generator=g, dtype=torch.float64)
    jumped = s.jump(e * coarse_noise, next_stage, g)
    blocks = jumped.unfold(-2, 2, 2).unfold(-2, 2, 2).reshape(-1, 4) / s_next
    cov = torch.cov(blocks.T)
    torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), atol=0.02, rtol=0)
    # Signal part: a fixed coarse image keeps its nearest-upsampled shape, scaled to 1 - s_next.
    signal = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
    x = (1 - e) * signal + e * torch.randn(draws, 1, size, size, generator=g, dtype=torch.float64)
    mean = s.jump(x, next_stage, g).mean(0)
    expected = (1 - s_next) * signal[0].repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(mean, expected, atol=0.03, rtol=0)


def test_training_pairs_match_an_independent_pyramid():
    s = schedule()
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(6, 3, 16, 16, generator=g)
    noise = torch.randn(6, 3, 16, 16, generator=g)
    stage = torch.tensor([2, 0, 1, 1, 2, 0])
    r = torch.tensor([1.0, 1.0, 0.5, 1e-6, 0.25, 1e-6])

    def down(x, times, scale):
        for _ in range(times):
            x = F.avg_pool2d(x, 2) * scale
        return x

    for pair in s.training_pairs(stage, clean, noise, r):
        k, st = pair.stage, s.stages[pair.stage]
        x, n = clean[pair.indices], noise[pair.indices]
        x_k, n_k = down(x, 2 - k, 1.0), down(n, 2 - k, 2.0)
        if k == 0:
            start = n_k
        else:
            up = down(x, 3 - k, 1.0).repeat_interleave(2, -1).repeat_interleave(2, -2)
            start = st.sigma_start * n_k + (1 - st.sigma_start) * up
        end = x_k if k == 2 else st.sigma_end * n_k + (1 - st.sigma_end) * x_k
        torch.testing.assert_close(pair.start, start)
        torch.testing.assert_close(pair.end, end)
        torch.testing.assert_close(pair.target, start - end)
        rr = r[pair.indices].view(-1, 1, 1, 1)
        torch.testing.assert_close(pair.input, rr * start + (1 - rr) * end)
        for j, rj in enumerate(r[pair.indices].tolist()):
            if rj == 1.0:
                torch.testing.assert_close(pair.input[j], start[j])
            if rj < 1e-5:
                torch.testing.assert_close(pair.input[j], end[j], atol=1e-4, rtol=0)
        assert pair.input.shape[-1] == 16 // st.downsample


def test_training_pairs_accept_video_latents():
    s = schedule()
    clean, noise = torch.randn(3, 2, 5, 8, 8), torch.randn(3, 2, 5, 8, 8)
    pairs = s.training_pairs(torch.tensor([0, 1, 2]), clean, noise, torch.rand(3))
    assert [p.input.shape for p in pairs] == [(1, 2, 5, 2, 2), (1, 2, 5, 4, 4), (1, 2, 5, 8, 8)]


def test_timestep_densities():
    g = torch.Generator().manual_seed(6)
    r = schedule(density="logit-normal", logit_mean=0.5, logit_std=0.7).sample_r(50_000, g)
    logit_u = torch.logit(1 - r.double())
    assert logit_u.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit_u.std().item() == pytest.approx(0.7, abs=0.02)
    for density in ("uniform", "mode"):
        r = schedule(density=density).sample_r(10_000, g)
        assert (r > 0).all() and (r <= 1).all()
    # mode with scale > 0 puts more mass in the middle than uniform does
    mode = schedule(density="mode", mode_scale=1.29).sample_r(50_000, g)
    uniform = schedule(density="uniform").sample_r(50_000, g)
    mid = lambda x: ((x > 0.25) & (x < 0.75)).float().mean().item()  # noqa: E731
    assert mid(mode) > mid(uniform) + 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stages": 0}, "stages"),
        ({"boundaries": [0, 0.6, 0.4, 1]}, "strictly increasing"),
        ({"boundaries": [0, 0.5, 1.2, 1]}, "strictly increasing"),
        ({"boundaries": [0.1, 0.5, 0.7, 1]}, "start at 0"),
        ({"boundaries": [0, 1]}, "needs 4"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": 0.5}, "1/3"),
        ({"preset": "pyramidflow"}, "pyramid-flow"),
        ({"density": "lognormal"}, "logit-normal"),
        ({"shift": 0}, "shift"),
    ],
)
def test_bad_configurations_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_odd_sizes_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="divisible by 2"):
        schedule().training_pairs(torch.tensor([0]), torch.randn(1, 1, 6, 6), torch.randn(1, 1, 6, 6), torch.ones(1))
