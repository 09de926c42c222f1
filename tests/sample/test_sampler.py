"""The pyramidal sampler against the math: with the exact velocity of a point-mass data distribution, Euler steps
are exact inside each stage window, so every stage must end on its end point, every stage must start from i.i.d.
unit noise at its start level (the jump's job), and the last stage lands on the data."""

from types import SimpleNamespace

import pytest
import torch

from pyraflow.config import ScheduleConfig
from pyraflow.packing import patchify, unpatchify
from pyraflow.sample import sample_pyramid
from pyraflow.schedule import PyramidSchedule, upsample_nearest
from pyraflow.text import TextEmbedding

PATCH = 2


class PointMassOracle:
    """Stands in for the model: for each packed segment it reads the stage and timestep the sampler gave it,
    recovers r, and returns the exact flow-matching velocity S_k - E_k for data = targets[caption] (the
    caption is read off the first text value). Written from the schedule's formulas, not from the sampler:
    x_r = D(r) + sigma(r) n with D(r) = r (1 - s_k) Up(c_{k-1}) + (1 - r)(1 - e_k) c_k and
    sigma(r) = r s_k + (1 - r) e_k, so n = (x_r - D(r)) / sigma(r) and v = (s_k - e_k) n + (1 - s_k) Up(c_{k-1}) - (1 - e_k) c_k.
    """

    def __init__(self, schedule: PyramidSchedule, targets: torch.Tensor):
        self.schedule, self.targets = schedule, targets
        self.config = SimpleNamespace(patch_size=PATCH)
        self.calls = 0
        self.starts: dict[tuple[int, int], torch.Tensor] = {}  # (stage, caption) -> the input at r = 1

    def eval(self):
        return self

    def prepare(self, layout, device, prefix=None):
        return None

    def __call__(self, batch, context=None, prefix=None):
        self.calls += 1
        lay, out = batch.layout, []
        for b in range(lay.num_segments):
            k = lay.stages[b]
            info = self.schedule.stages[k]
            t_max, t_min = info.timestep_window
            r = (float(batch.timestep[b]) - t_min) / (t_max - t_min)
            caption = int(batch.text[lay.text_offsets[b], 0])
            levels = self.schedule.data_pyramid(self.targets[caption : caption + 1])
            c_k = levels[k][0]
            up_prev = upsample_nearest(levels[k - 1])[0] if k > 0 else torch.zeros_like(c_k)
            s, e = info.sigma_start, info.sigma_end
            shape = lay.shapes[b]
            x = unpatchify(batch.visual[lay.visual_offsets[b] : lay.visual_offsets[b + 1]], shape, PATCH)
            if abs(r - 1) < 1e-6:
                self.starts[(k, caption)] = x.clone()
            data = r * (1 - s) * up_prev + (1 - r) * (1 - e) * c_k
            n = (x - data) / (r * s + (1 - r) * e)
            v = (s - e) * n + (1 - s) * up_prev - (1 - e) * c_k
            out.append(patchify(v, PATCH))
        return torch.cat(out)


def captions(n: int, null: bool = False) -> TextEmbedding:
    tokens = torch.zeros(n, 3, 5)
    tokens[:, :, 0] = torch.arange(n, dtype=torch.float32)[:, None]  # caption index in the first value
    lengths = torch.tensor([1 if null else 2 + i % 2 for i in range(n)])
    return TextEmbedding(tokens, lengths, torch.zeros(n, 4))


@pytest.mark.parametrize("preset", ["continuous", "pyramid-flow"])
@pytest.mark.parametrize("steps", [[1, 1, 1], [3, 5, 2]])
def test_sampling_with_the_exact_velocity_lands_on_the_data(preset, steps):
    schedule = PyramidSchedule(ScheduleConfig(preset=preset, stages=3))
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 2, 1, 16, 16, generator=g)  # three captions, three different data points
    oracle = PointMassOracle(schedule, targets)
    # guidance 1: the conditional branch alone; the null caption (index 0) would pull towards targets[0]
    latents, timings = sample_pyramid(oracle, schedule, captions(3), captions(1, null=True), (2, 1, 16, 16), steps,
                                      guidance=1.0, generator=g)
    torch.testing.assert_close(latents, targets, rtol=0, atol=1e-4)
    assert oracle.calls == sum(steps) and len(timings) == 3


def test_guidance_combines_the_branches_and_changes_the_result_only_when_they_differ():
    schedule = PyramidSchedule(ScheduleConfig(stages=2))
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 2, 1, 8, 8, generator=g)
    oracle = PointMassOracle(schedule, targets)
    # the null caption reads as caption 0: for caption 0 both branches agree, so guidance 3 still lands on it;
    # for caption 1 they disagree and guidance moves the result away from targets[1] (past it, away from targets[0])
    latents, _ = sample_pyramid(oracle, schedule, captions(2), captions(1, null=True), (2, 1, 8, 8), [4, 4],
                                guidance=3.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(latents[0], targets[0], rtol=0, atol=1e-4)
    assert (latents[1] - targets[1]).abs().max() > 1e-2
    # for a point mass the guided velocity is the oracle of targets[0] + 3 (targets[1] - targets[0])
    torch.testing.assert_close(latents[1], targets[0] + 3 * (targets[1] - targets[0]), rtol=0, atol=1e-4)
    assert oracle.calls == 8


def stage_states(schedule: PyramidSchedule, targets: torch.Tensor, steps: list[int], seed: int):
    """Sample with the oracle; per stage the state at its start (what the first model call sees) and at its end
    (what the jump receives, or the result), each (B, C, T, h, w)."""
    oracle = PointMassOracle(schedule, targets)
    ends = []
    jump = schedule.jump
    schedule.jump = lambda x, k, g: ends.append(x.clone()) or jump(x, k, g)
    latents, _ = sample_pyramid(oracle, schedule, captions(len(targets)), captions(1, null=True), targets.shape[1:],
                                steps, guidance=1.0, generator=torch.Generator().manual_seed(seed))
    ends.append(latents)
    starts = [torch.stack([oracle.starts[(k, j)] for j in range(len(targets))]) for k in range(schedule.num_stages)]
    return starts, ends


def check_stages(schedule: PyramidSchedule, targets: torch.Tensor, starts, ends) -> None:
    """Independent of the sampler's code: stage k must start at s_k n + (1 - s_k) Up(c_{k-1}) with n i.i.d. unit
    noise (no correlation inside the 2x2 blocks upsampling makes), and end at e_k n + (1 - e_k) c_k with that n."""
    levels = schedule.data_pyramid(targets)
    for k, info in enumerate(schedule.stages):
        s, e = info.sigma_start, info.sigma_end
        up_prev = upsample_nearest(levels[k - 1]) if k > 0 else torch.zeros_like(levels[k])
        n = (starts[k] - (1 - s) * up_prev) / s
        assert abs(float(n.mean())) < 0.05, f"stage {k} starts off its signal level (noise mean {float(n.mean()):.3f})"
        assert abs(float(n.var()) - 1) < 0.1, f"stage {k} starts with noise of variance {float(n.var()):.3f}, not 1"
        blocks = n.unflatten(-2, (-1, 2)).unflatten(-1, (-1, 2))  # (..., h/2, 2, w/2, 2)
        pairs = (blocks[..., 0, :, 0] * blocks[..., 1, :, 1]).mean() + (blocks[..., 0, :, 0] * blocks[..., 0, :, 1]).mean()
        assert abs(float(pairs)) / 2 < 0.05, f"stage {k} starts with noise correlated inside 2x2 blocks ({float(pairs) / 2:.3f})"
        torch.testing.assert_close(ends[k], e * n + (1 - e) * levels[k], rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", ["continuous", "pyramid-flow"])
def test_every_stage_starts_from_unit_noise_and_ends_on_its_end_point(preset):
    schedule = PyramidSchedule(ScheduleConfig(preset=preset, stages=3))
    targets = torch.randn(24, 2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    check_stages(schedule, targets, *stage_states(schedule, targets, [2, 3, 2], seed=4))


@pytest.mark.parametrize("wrong", [(0.7, 2.0), (1.0, 1.15), (1.25, 1.0)])
def test_wrong_jump_coefficients_fail_the_stage_checks(wrong, monkeypatch):
    """The checks above catch a jump that renoises with other coefficients than (a, b)."""
    schedule = PyramidSchedule(ScheduleConfig(stages=3))
    right = schedule.jump_coefficients
    monkeypatch.setattr(schedule, "jump_coefficients", lambda k: (wrong[0] * right(k)[0], wrong[1] * right(k)[1]))
    targets = torch.randn(24, 2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(AssertionError):
        check_stages(schedule, targets, *stage_states(schedule, targets, [2, 3, 2], seed=4))


def test_uncorrelated_block_noise_fails_the_stage_checks(monkeypatch):
    """A jump with plain Gaussian noise instead of block noise leaves the upsampled noise's block correlation."""
    import pyraflow.schedule as schedule_module

    schedule = PyramidSchedule(ScheduleConfig(stages=3))
    monkeypatch.setattr(schedule_module, "block_noise",
                        lambda shape, gamma, generator=None, dtype=None, device=None: torch.randn(shape, generator=generator))
    targets = torch.randn(24, 2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(AssertionError, match="correlated"):
        check_stages(schedule, targets, *stage_states(schedule, targets, [2, 3, 2], seed=4))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_both_solvers_land_on_the_data_with_the_exact_velocity(solver):
    schedule = PyramidSchedule(ScheduleConfig(stages=3))
    targets = torch.randn(2, 2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    oracle = PointMassOracle(schedule, targets)
    latents, _ = sample_pyramid(oracle, schedule, captions(2), captions(1, null=True), (2, 1, 16, 16), [3, 3, 3],
                                guidance=1.0, generator=torch.Generator().manual_seed(6), solver=solver)
    torch.testing.assert_close(latents, targets, rtol=0, atol=1e-4)
    assert oracle.calls == (9 if solver == "euler" else 9 + 6)  # heun: a second call on every step but the last


def test_heun_is_second_order_where_euler_is_first():
    """dx/dr = x from r = 1 to 0 ends at x(1) / e; halving the step size divides the error by 2^order."""
    import math

    from pyraflow.sample.sampler import integrate

    for solver, order in (("euler", 1), ("heun", 2)):
        errors = [abs(float(integrate(lambda x, r: x, torch.ones(1, dtype=torch.float64),
                                      torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), solver)) - math.exp(-1))
                  for n in (20, 40)]
        assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)
    with pytest.raises(ValueError, match="solver 'rk4' is unknown"):
        integrate(lambda x, r: x, torch.ones(1), torch.linspace(1, 0, 3), "rk4")
