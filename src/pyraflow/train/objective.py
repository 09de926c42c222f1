"""The training objective: examples (inputs and velocity targets) for images and video units, and the loss.

An image example at stage k is the schedule's training pair (``PyramidSchedule.training_pairs``); a video-unit
example is the same pair for the unit's frames, conditioned on its compressed, noised history
(``pyraflow.video.history_parts``). Every example is a packing ``Sample`` that carries its target, so the
packed batch holds inputs and targets in one order. Every sample counts equally in the loss (mean squared
error per sample, averaged over samples), matching a stage mix counted in samples.
"""

from __future__ import annotations

import torch

from pyraflow.config import VideoConfig
from pyraflow.packing import PackedBatch, Sample
from pyraflow.schedule import PyramidSchedule
from pyraflow.video import history_parts

Caption = tuple[torch.Tensor, torch.Tensor]  # (token states (L, D), pooled (D_pooled,))


def image_examples(schedule: PyramidSchedule, clean: torch.Tensor, stages: torch.Tensor, noise: torch.Tensor,
                   r: torch.Tensor, captions: list[Caption]) -> list[Sample]:
    """Examples of whole samples (images, or clips trained at once), grouped by stage.

    clean, noise: (B, C, T, H, W) at full resolution; stages, r: (B,); captions: one per row.
    """
    examples = []
    for pair in schedule.training_pairs(stages, clean, noise, r):
        for j, row in enumerate(pair.indices.tolist()):
            examples.append(Sample(pair.stage, pair.input[j], *captions[row], pair.timestep[j], target=pair.target[j]))
    return examples


def unit_examples(schedule: PyramidSchedule, clean: torch.Tensor, stages: torch.Tensor, units: torch.Tensor,
                  spans: list[tuple[int, int]], config: VideoConfig, captions: list[Caption],
                  generator: torch.Generator) -> list[Sample]:
    """Examples of video units, each with its compressed history corrupted by one noise level per example.

    clean: (B, C, T, H, W) full-resolution videos; stages, units: (B,) the class of each row. Examples come
    grouped by unit length, then by stage.
    """
    levels = schedule.data_pyramid(clean)
    sigma = torch.rand(len(clean), generator=generator) * config.history_noise
    noise_levels = schedule.noise_pyramid(torch.randn(clean.shape, generator=generator))
    examples = []
    for frames in sorted({spans[u][1] for u in units.tolist()}):
        idx = torch.tensor([i for i, u in enumerate(units.tolist()) if spans[u][1] == frames], dtype=torch.long)
        current = torch.stack([clean[i, :, spans[int(units[i])][0] : spans[int(units[i])][0] + frames] for i in idx.tolist()])
        noise = torch.randn(current.shape, generator=generator)
        r = schedule.sample_r(len(idx), generator)
        for pair in schedule.training_pairs(stages[idx], current, noise, r):
            for j, row in enumerate(pair.indices.tolist()):
                i = int(idx[row])
                u = int(units[i])
                parts = history_parts([lv[i] for lv in levels], spans, u, pair.stage, config.max_history_units,
                                      float(sigma[i]), [nv[i] for nv in noise_levels], schedule.config.num_timesteps)
                examples.append(Sample(pair.stage, pair.input[j], *captions[i], pair.timestep[j], parts, spans[u][0], u,
                                       target=pair.target[j]))
    return examples


def flow_matching_loss(velocity: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over samples of each sample's mean squared error on its predicted (non-history) tokens.

    velocity: (Nv, D) model output over every visual token. Returns (loss, per-sample losses (B,) in packed order,
    detached).
    """
    if batch.target is None:
        raise ValueError("the batch carries no targets; build it from samples with a target (pyraflow.train.objective).")
    if batch.predicted.numel() != velocity.shape[0]:  # drop history tokens
        velocity = velocity.index_select(0, batch.predicted)
    lengths = torch.tensor(batch.layout.predicted_lengths, device=velocity.device)
    per_token = (velocity.float() - batch.target).square().mean(-1)
    per_sample = torch.zeros(len(lengths), device=velocity.device).index_add_(0, batch.predicted_segment, per_token) / lengths
    return per_sample.mean(), per_sample.detach()
