"""The pyramidal flow-matching schedule: stages, sigma windows, timestep windows, pyramids, jumps.

Convention, stated once for the whole package: ``sigma`` in [0, 1] is the noise level and
``x_sigma = sigma * noise + (1 - sigma) * data``, so sigma = 1 is pure noise (as in diffusers and SD3).

Stage 0 is the coarsest; stage k works at ``2 ** (K - 1 - k)`` times below full resolution per side.
Inside stage k a local coordinate ``r`` in (0, 1] runs from the stage's start point (r = 1) to its
end point (r -> 0): ``x = r * S_k + (1 - r) * E_k`` with velocity target ``S_k - E_k``.

The model sees a timestep on a 0..``num_timesteps`` axis. Each stage owns a window of that axis, sized
by its sigma distance ``s_k - e_k``; the windows tile the axis without overlap, so the timestep alone
tells the model which stage it is in.

Everything here is a pure function of its arguments (no hidden step counters); of the package it imports
only its config section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyraflow.config import ScheduleConfig, uniform_boundaries

def shift_sigma(sigma: float, shift: float) -> float:
    """SD3's shift: pushes sigma towards noise for shift > 1, keeping 0 and 1 fixed."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def corrected_start(previous_end: float, gamma: float) -> float:
    """Start sigma of a stage whose predecessor ended at ``previous_end``.

    After a jump the signal kept, c = 1 - previous_end, is rescaled by
    a = 1 / (sqrt(1 + 1/gamma) * (1 - c) + c), so the new stage starts at sigma = 1 - a * c.
    """
    c = 1.0 - previous_end
    return 1.0 - c / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - c) + c)


@dataclass(frozen=True)
class StageInfo:
    stage: int
    downsample: int
    sigma_start: float
    sigma_end: float
    timestep_window: tuple[float, float]
    """(t_max, t_min) on the model's timestep axis; r = 1 maps to t_max, r -> 0 to t_min."""


@dataclass
class StagePair:
    """Training tensors for the samples of one stage (rows ``indices`` of the input batch)."""

    stage: int
    indices: torch.Tensor  # (n,) long, rows of the input batch
    r: torch.Tensor  # (n,)
    timestep: torch.Tensor  # (n,) on the model axis
    start: torch.Tensor  # (n, C, [T,] h, w)  S_k
    end: torch.Tensor  # (n, C, [T,] h, w)  E_k
    input: torch.Tensor  # r * S_k + (1 - r) * E_k
    target: torch.Tensor  # S_k - E_k


class PyramidSchedule:
    """Stage windows and the operations that use them. Built once from a ScheduleConfig."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        cfg = self.config
        self.num_stages = cfg.stages
        bounds = cfg.boundaries or uniform_boundaries(cfg.stages)
        if cfg.preset == "pyramid-flow":
            starts, ends, windows = _reference_tables(bounds, cfg.gamma, cfg.shift, cfg.num_timesteps)
            self.r_min = 1.0 / cfg.num_timesteps
        else:
            starts, ends, windows = _continuous_tables(bounds, cfg.gamma, cfg.shift, cfg.num_timesteps)
            self.r_min = 0.0
        self.stages = tuple(
            StageInfo(k, 2 ** (cfg.stages - 1 - k), starts[k], ends[k], windows[k])
            for k in range(cfg.stages)
        )

    # ----- per-stage numbers -------------------------------------------------------------------
    def downsample(self, stage: int) -> int:
        return self.stages[stage].downsample

    def _column(self, values: list[float], stage: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=stage.device)[stage]

    def timestep(self, stage: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Model timestep for local coordinate r of each sample's stage: t_min + r * (t_max - t_min)."""
        t_max = self._column([s.timestep_window[0] for s in self.stages], stage)
        t_min = self._column([s.timestep_window[1] for s in self.stages], stage)
        return (t_min + r.double() * (t_max - t_min)).to(r.dtype)

    def sigma(self, stage: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Noise level of the interpolated input: r * s_k + (1 - r) * e_k."""
        s = self._column([s.sigma_start for s in self.stages], stage)
        e = self._column([s.sigma_end for s in self.stages], stage)
        return (e + r.double() * (s - e)).to(r.dtype)

    # ----- drawing r ---------------------------------------------------------------------------
    def sample_r(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n local coordinates r in (0, 1] from the configured density of u = 1 - r."""
        cfg = self.config
        if cfg.density == "logit-normal":
            u = torch.sigmoid(torch.randn(n, generator=generator) * cfg.logit_std + cfg.logit_mean)
        else:
            u = torch.rand(n, generator=generator)
            if cfg.density == "mode":
                u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        if cfg.preset == "pyramid-flow":
            index = (u * cfg.num_timesteps).long().clamp(0, cfg.num_timesteps - 1)
            return 1.0 - index.float() / cfg.num_timesteps
        return (1.0 - u).clamp(min=torch.finfo(torch.float32).eps, max=1.0)

    def sampling_grid(self, num_steps: int) -> torch.Tensor:
        """The r values an Euler sampler visits in one stage: num_steps + 1 points from 1 to 0.

        The pyramid-flow preset keeps the reference's grid: linspace(1, 1/N, steps) then 0.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1.")
        if self.config.preset == "pyramid-flow":
            grid = torch.linspace(1.0, self.r_min, num_steps, dtype=torch.float64)
            return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)

    # ----- pyramids ----------------------------------------------------------------------------
    def data_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Full-resolution data (B, C, [T,] H, W) -> K levels, coarsest first (bilinear halving)."""
        levels = [x]
        for _ in range(self.num_stages - 1):
            levels.append(halve(levels[-1]))
        return levels[::-1]

    def noise_pyramid(self, noise: torch.Tensor) -> list[torch.Tensor]:
        """One full-resolution Gaussian -> K levels, coarsest first; x2 per halving keeps unit variance.

        Bilinear halving averages each 2x2 block (variance 1/4), so doubling restores variance 1.
        """
        levels = [noise]
        for _ in range(self.num_stages - 1):
            levels.append(halve(levels[-1]) * 2.0)
        return levels[::-1]

    def _levels(self, x: torch.Tensor, stage: int, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Levels ``stage`` and ``stage - 1`` of a pyramid, computing only the halvings needed."""
        current = x
        for _ in range(self.num_stages - 1 - stage):
            current = halve(current) * scale
        previous = halve(current) * scale if stage > 0 else None
        return current, previous

    def training_pairs(
        self,
        stage: torch.Tensor,
        clean: torch.Tensor,
        noise: torch.Tensor,
        r: torch.Tensor,
    ) -> list[StagePair]:
        """Training inputs and velocity targets for a batch whose samples sit at different stages.

        stage: (B,) long; clean, noise: (B, C, [T,] H, W) at full resolution; r: (B,) in (0, 1].
        Samples are grouped by stage so each stage is computed in one vectorised pass.
        Returns one StagePair per stage present, in increasing stage order.
        """
        if clean.shape != noise.shape:
            raise ValueError(f"clean {tuple(clean.shape)} and noise {tuple(noise.shape)} differ in shape.")
        pairs = []
        for k in torch.unique(stage).tolist():
            if not 0 <= k < self.num_stages:
                raise ValueError(f"stage {k} is outside 0..{self.num_stages - 1}.")
            idx = (stage == k).nonzero().flatten()
            info = self.stages[k]
            x_k, x_prev = self._levels(clean[idx], k, 1.0)
            n_k, _ = self._levels(noise[idx], k, 2.0)
            start = info.sigma_start * n_k
            if k > 0:
                start = start + (1 - info.sigma_start) * upsample_nearest(x_prev)
            end = info.sigma_end * n_k + (1 - info.sigma_end) * x_k
            rk = r[idx].to(clean.dtype).view(-1, *([1] * (clean.dim() - 1)))
            pairs.append(
                StagePair(
                    stage=k,
                    indices=idx,
                    r=r[idx],
                    timestep=self.timestep(stage[idx], r[idx]),
                    start=start,
                    end=end,
                    input=rk * start + (1 - rk) * end,
                    target=start - end,
                )
            )
        return pairs

    # ----- stage jumps (sampling) --------------------------------------------------------------
    def jump_coefficients(self, next_stage: int) -> tuple[float, float]:
        """(a, b) of the renoise x <- a * Up(x) + b * block_noise when entering ``next_stage``."""
        if not 1 <= next_stage < self.num_stages:
            raise ValueError(f"next_stage={next_stage} must be in 1..{self.num_stages - 1}.")
        c = 1.0 - self.stages[next_stage - 1].sigma_end
        gamma = self.config.gamma
        a = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - c) + c)
        b = a * (1.0 - c) / math.sqrt(gamma)
        return a, b

    def jump(self, x: torch.Tensor, next_stage: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Move the end point of stage next_stage-1 to the start point of next_stage.

        Nearest 2x upsampling makes the noise identical inside each 2x2 block; adding block noise with
        correlation -gamma cancels that, so the result has i.i.d. unit-variance noise at level s_k.
        """
        a, b = self.jump_coefficients(next_stage)
        up = upsample_nearest(x)
        return a * up + b * block_noise(up.shape, self.config.gamma, generator, up.dtype, up.device)


def block_noise(
    shape: torch.Size | tuple[int, ...],
    gamma: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian noise whose 4 values in each 2x2 block have covariance (1+gamma) I - gamma 11^T.

    Drawn for all blocks at once: the covariance has eigenvalue 1 - 3*gamma along the block mean and
    1 + gamma orthogonal to it, so n = sqrt(1+gamma) (z - mean(z)) + sqrt(1-3*gamma) mean(z).
    """
    if shape[-1] % 2 or shape[-2] % 2:
        raise ValueError(f"block noise needs even height and width, got {tuple(shape)}.")
    z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    mean = upsample_nearest(halve(z))  # each 2x2 block's mean, repeated over the block
    return math.sqrt(1 + gamma) * (z - mean) + math.sqrt(max(1 - 3 * gamma, 0.0)) * mean


def _spatial(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op over the last two axes of (..., H, W) (channels and frames ride in the batch)."""
    if x.dim() < 2:
        raise ValueError(f"expected a tensor of shape (..., H, W), got shape {tuple(x.shape)}.")
    lead = x.shape[:-2]
    y = fn(x.reshape(-1, 1, *x.shape[-2:]))
    return y.reshape(*lead, *y.shape[-2:])


def halve(x: torch.Tensor) -> torch.Tensor:
    """Bilinear downsampling by exactly 2 per side (averages each 2x2 block)."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(
            f"cannot halve a latent of spatial size {tuple(x.shape[-2:])}: height and width must be "
            "divisible by 2 ** (stages - 1)."
        )
    return _spatial(lambda y: F.interpolate(y, scale_factor=0.5, mode="bilinear", align_corners=False), x)


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling per side (each value fills a 2x2 block)."""
    return _spatial(lambda y: F.interpolate(y, scale_factor=2, mode="nearest"), x)


def _continuous_tables(bounds: list[float], gamma: float, shift: float, num_timesteps: int):
    K = len(bounds) - 1
    ends = [shift_sigma(1.0 - b, shift) for b in bounds[1:]]
    ends[-1] = 0.0
    starts = [1.0] + [corrected_start(ends[k - 1], gamma) for k in range(1, K)]
    return starts, ends, _windows(starts, ends, num_timesteps)


def _windows(starts: list[float], ends: list[float], num_timesteps: int) -> list[tuple[float, float]]:
    distance = [s - e for s, e in zip(starts, ends)]
    total = sum(distance)
    cumulative = [sum(distance[:k]) / total for k in range(len(distance) + 1)]
    cumulative[-1] = 1.0
    return [
        (num_timesteps * (1 - cumulative[k]), num_timesteps * (1 - cumulative[k + 1]))
        for k in range(len(distance))
    ]


def _reference_tables(bounds: list[float], gamma: float, shift: float, n: int):
    """Pyramid Flow's discretised numbers: a float32 sigma table of n entries (1 .. 1/n), stage
    boundaries read at int(boundary * n), corrected starts, and windows read back from the table."""
    table = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n
    table = shift * table / (1 + (shift - 1) * table)
    timesteps = table * n
    K = len(bounds) - 1
    starts, ends = [], []
    for k in range(K):
        start = table[max(int(bounds[k] * n), 0)].item()
        end_index = min(int(bounds[k + 1] * n), n)
        end = table[end_index].item() if end_index < n else 0.0
        if k > 0:
            start = corrected_start(start, gamma)
        starts.append(start)
        ends.append(end)
    distance = [s - e for s, e in zip(starts, ends)]
    total = sum(distance)
    windows = []
    for k in range(K):
        lo = 0.0 if k == 0 else sum(distance[:k]) / total
        hi = 1.0 if k == K - 1 else sum(distance[: k + 1]) / total
        windows.append((timesteps[int(lo * n)].item(), timesteps[min(int(hi * n), n - 1)].item()))
    return starts, ends, windows
