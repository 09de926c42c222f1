"""The pyramidal sampler against the math: with the exact velocity of a point-mass data distribution,
Euler steps are exact inside each stage window, so sampling must land on that point."""

from types import SimpleNamespace

import pytest
import torch

from pyraflow.packing import patchify, unpatchify
from pyraflow.sampling import sample_pyramid
from pyraflow.schedule import PyramidSchedule, ScheduleConfig, upsample_nearest
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
