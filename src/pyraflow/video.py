"""The temporal pyramid: video as a first frame plus units of F frames, generated one unit at a time.

A video latent (C, T, H, W) with T = 1 + U * F is split into *units*: unit 0 is the first frame alone
(an image), unit u >= 1 holds frames 1 + (u - 1) F .. u F. Each training example predicts one unit at one
stage of the spatial pyramid, conditioned on its history, which is compressed: the most recent unit at
the current stage's resolution, each older unit one stage lower, the oldest ones at stage 0. Unit 0
examples have no history, so images and videos train together in one model.

History is clean data corrupted with one random noise level per example (sigma_h ~ U(0, history_noise),
x = (1 - sigma_h) x + sigma_h n), and that level reaches the model as the history's own timestep,
sigma_h * num_timesteps. Attention is temporally causal at unit granularity: a token sees the text, its
own unit and earlier units.

The token-budget batcher treats every (stage, unit) pair as a class with its own segment length (history
makes later units longer; see pyraflow.batching.classes); training examples are built in
pyraflow.train.objective, sampling goes unit by unit in pyraflow.sample.
"""

from __future__ import annotations

import torch

from pyraflow.config import VideoConfig, unit_spans
from pyraflow.packing import HistoryPart

__all__ = ["VideoConfig", "history_parts", "history_stage", "history_tokens", "history_units", "unit_spans"]


def history_stage(stage: int, distance: int) -> int:
    """Stage of a history unit ``distance`` units back (1 = the most recent) when predicting at ``stage``."""
    return max(stage - (distance - 1), 0)


def history_units(unit: int, max_history_units: int | None) -> range:
    first = 0 if max_history_units is None else max(0, unit - max_history_units)
    return range(first, unit)


def history_parts(levels: list[torch.Tensor], spans: list[tuple[int, int]], unit: int, stage: int,
                  max_history_units: int | None, sigma: float = 0.0, noise: list[torch.Tensor] | None = None,
                  num_timesteps: int = 1000) -> list[HistoryPart]:
    """The compressed history of one example, oldest first.

    levels: the video's spatial pyramid (coarsest first), each (C, T, h_k, w_k) over all frames (later frames
    may be anything: only units before ``unit`` are read). noise: matching pyramid of unit-variance noise,
    needed when sigma > 0.
    """
    parts = []
    for j in history_units(unit, max_history_units):
        k = history_stage(stage, unit - j)
        first, count = spans[j]
        latent = levels[k][:, first : first + count]
        if sigma > 0:
            latent = (1 - sigma) * latent + sigma * noise[k][:, first : first + count]
        parts.append(HistoryPart(k, latent, sigma * num_timesteps, first, j))
    return parts


def history_tokens(spans: list[tuple[int, int]], unit: int, stage: int, max_history_units: int | None,
                   stage_frame_tokens: list[int]) -> int:
    """Visual tokens of an example's history; stage_frame_tokens[k]: tokens of one frame at stage k."""
    return sum(spans[j][1] * stage_frame_tokens[history_stage(stage, unit - j)]
               for j in history_units(unit, max_history_units))
