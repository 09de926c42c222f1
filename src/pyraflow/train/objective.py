"""The training objective: examples (inputs and velocity targets) for images and video units, and the loss.

An image example at stage k is the schedule's training pair (``PyramidSchedule.training_pairs``); a video-unit
example is the same pair for the unit's frames, conditioned on its compressed, noised history
(``pyraflow.video.history_parts``). Every example is a packing ``Sample`` that carries its target, so the
packed batch holds inputs and targets in one order. Every sample counts equally in the loss (mean squared
error per sample, averaged over samples), matching a stage mix counted in samples.
"""

from __future__ import annotations

import numpy as np
import torch

from pyraflow.config import Config, VideoConfig, unit_spans
from pyraflow.packing import PackedBatch, Sample, pack
from pyraflow.schedule import PyramidSchedule
from pyraflow.video import history_parts

Caption = tuple[torch.Tensor, torch.Tensor]  # (token states (L, D), pooled (D_pooled,))


def batch_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """The random state of batch ``index`` on ``rank``: a pure function of the three (counter-based), so any
    process that builds the batch draws the same noise, r, caption dropout and image swaps, a resume needs no
    saved generator, and ranks draw differently."""
    high, low = np.random.SeedSequence([seed, rank, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


class ExampleBuilder:
    """Turns one planned batch (samples and their classes) into a packed batch of examples with their targets.

    Runs where the loader builds batches (a DataLoader worker, or the training process with no workers).
    ``images``: the encoded video.image_dataset, whose images replace a share of the unit-0 examples.
    """

    def __init__(self, config: Config, schedule: PyramidSchedule, classes, null: Caption, images=None, rank: int = 0):
        self.config, self.schedule, self.classes, self.null, self.images = config, schedule, classes, null, images
        self.rank = rank

    def __call__(self, plan, latents: list[torch.Tensor], captions: list[Caption]) -> tuple[PackedBatch, int]:
        """plan: a BatchPlan (sample ids, classes, index); latents: one (C, T, H, W) per sample (shapes may differ
        across buckets); captions: one per sample."""
        cfg = self.config
        g = batch_generator(cfg.train.seed, self.rank, plan.index)
        stages = torch.tensor([self.classes.stages[c] for c in plan.classes])
        groups = shape_groups(latents)  # rows of equal shape, each computed in one vectorised pass

        def dropout(captions: list[Caption]) -> tuple[list[Caption], torch.Tensor]:
            drop = torch.rand(len(captions), generator=g) < cfg.train.text_dropout
            return [self.null if drop[row] else c for row, c in enumerate(captions)], drop

        examples = []
        if cfg.video_units():
            units = torch.tensor([self.classes.units[c] for c in plan.classes])
            captions, dropped = dropout(captions)
            clean = [torch.stack([latents[i] for i in rows]) for rows in groups]
            if self.images is not None:
                for rows, group in zip(groups, clean):
                    self._swap_in_images(group, units[rows], dropped[rows], g, captions, rows)
            for rows, group in zip(groups, clean):
                spans = unit_spans(group.shape[2], cfg.video.unit_frames)
                examples += unit_examples(self.schedule, group, stages[rows], units[rows], spans, cfg.video,
                                          [captions[i] for i in rows], g)
        else:
            clean = [torch.stack([latents[i] for i in rows]) for rows in groups]
            noise = [torch.randn(group.shape, generator=g) for group in clean]
            r = self.schedule.sample_r(len(latents), g)
            captions, _ = dropout(captions)
            for rows, group, group_noise in zip(groups, clean, noise):
                examples += image_examples(self.schedule, group, stages[rows], group_noise, r[rows],
                                           [captions[i] for i in rows])
        m = cfg.model
        packed = pack(examples, self.schedule.num_stages, m.patch_size, m.in_channels, m.text_dim, m.pooled_dim)
        return packed, packed.layout.num_visual + packed.layout.num_text

    def _swap_in_images(self, clean: torch.Tensor, units: torch.Tensor, dropped: torch.Tensor, g: torch.Generator,
                        captions: list, rows: list[int]) -> None:
        """Give a share of the image examples (unit 0) an image and caption of video.image_dataset instead of a
        clip's first frame, in place in ``clean`` (one shape group) and ``captions`` (captions stay null where
        dropout chose so)."""
        pick = (units == 0) & (torch.rand(len(units), generator=g) < self.config.video.image_dataset_share)
        picked = pick.nonzero().flatten()
        if not len(picked):
            return
        chosen = torch.randint(len(self.images), (len(picked),), generator=g)
        for j, image in zip(picked.tolist(), chosen.tolist()):
            clean[j, :, 0] = self.images.latent(image)[:, 0]
            if not dropped[j]:
                captions[rows[j]] = self.images.text(image)


def shape_groups(latents: list[torch.Tensor]) -> list[list[int]]:
    """Row indices of the latents grouped by shape, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(latents):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


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
