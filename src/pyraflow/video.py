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
makes later units longer); the stage mix is spread over units by ``unit_probabilities``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyraflow.packing import HistoryPart


@dataclass
class VideoConfig:
    """Autoregressive video over units of frames (leave unit_frames unset for images or whole clips)."""

    unit_frames: int | None = None
    """Frames per unit F. Set: data.frames must be 1 + U * F, and training predicts one unit per example
    conditioned on the earlier ones. None: every sample is generated whole (images, or clips at once)."""
    image_ratio: float = 0.25
    """Share of training examples that are unit 0 (the first frame alone, i.e. an image); the rest spread
    evenly over units 1..U."""
    history_noise: float = 0.1
    """History is corrupted with a noise level drawn uniformly from [0, history_noise] per example."""
    max_history_units: int | None = None
    """Condition on at most this many earlier units (None: all of them)."""
    sample_history_noise: float = 0.0
    """Noise level of the history when sampling (0: the generated frames as they are)."""
    max_frames: int | None = None
    """Longest video ``pyraflow sample --frames`` may ask for; None: the training clip length (data.frames)."""
    cache: bool = True
    """Compute the text and history keys/values once per unit when sampling instead of at every step."""
    image_dataset: str | None = None
    """An image-only dataset trained beside the clips (``mnist`` or ``image-folder``, brought to data.image_size
    and data.channels): a share of the image examples (unit 0) take an image and its caption from it instead
    of a clip's first frame. None: images are the clips' first frames only."""
    image_path: str | None = None
    """Folder for ``image_dataset: image-folder`` (images, captioned by captions.jsonl or .txt files as for data.path)."""
    image_dataset_share: float = 0.5
    """Share of the image examples (unit 0) drawn from image_dataset; the rest are first frames of the clips."""

    def __post_init__(self) -> None:
        if self.unit_frames is not None and self.unit_frames < 1:
            raise ValueError(f"video.unit_frames={self.unit_frames} must be >= 1 (or null for no units).")
        if not 0 <= self.image_ratio <= 1:
            raise ValueError(f"video.image_ratio={self.image_ratio} must be in [0, 1].")
        for name in ("history_noise", "sample_history_noise"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"video.{name}={getattr(self, name)} must be in [0, 1).")
        if self.max_history_units is not None and self.max_history_units < 1:
            raise ValueError(f"video.max_history_units={self.max_history_units} must be >= 1 (or null for all).")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"video.max_frames={self.max_frames} must be >= 1 (or null).")
        if self.image_dataset not in (None, "mnist", "image-folder"):
            raise ValueError(f"video.image_dataset={self.image_dataset!r} must be mnist, image-folder or null.")
        if self.image_dataset == "image-folder" and self.image_path is None:
            raise ValueError("video.image_dataset=image-folder needs video.image_path (the folder of images).")
        if not 0 <= self.image_dataset_share <= 1:
            raise ValueError(f"video.image_dataset_share={self.image_dataset_share} must be in [0, 1].")


def unit_spans(frames: int, unit_frames: int) -> list[tuple[int, int]]:
    """(first frame, number of frames) of every unit of a ``frames``-long video: unit 0 is frame 0 alone."""
    if frames < 1 or (frames - 1) % unit_frames:
        raise ValueError(
            f"a video of {frames} frames is not a first frame plus units of {unit_frames} frames; use "
            f"1 + U * {unit_frames} frames (e.g. {1 + unit_frames * max(1, (frames - 1) // unit_frames)})."
        )
    return [(0, 1)] + [(1 + u * unit_frames, unit_frames) for u in range((frames - 1) // unit_frames)]


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


def unit_probabilities(num_units: int, image_ratio: float) -> np.ndarray:
    """How training examples spread over units 0..num_units-1 (unit 0: the first frame alone)."""
    if num_units == 1:
        return np.ones(1)
    rest = (1 - image_ratio) / (num_units - 1)
    return np.asarray([image_ratio] + [rest] * (num_units - 1))


class UnitMix:
    """A stage mix spread over units: class (stage k, unit u) gets ratio[k] * p[u].

    Classes are ordered stage-major, class = k * num_units + u. Feedback and state go to the stage mix.
    """

    def __init__(self, stage_mix, unit_probs: np.ndarray):
        self.stage_mix = stage_mix
        self.unit_probs = np.asarray(unit_probs, dtype=np.float64)

    def ratio(self, step: int) -> np.ndarray:
        return np.outer(self.stage_mix.ratio(step), self.unit_probs).ravel()

    def support(self) -> np.ndarray:
        return np.outer(self.stage_mix.support(), self.unit_probs > 0).ravel()

    def observe(self, step: int, stage_losses: dict[int, float]) -> None:
        if hasattr(self.stage_mix, "observe"):
            self.stage_mix.observe(step, stage_losses)

    def state_dict(self) -> dict:
        return self.stage_mix.state_dict() if hasattr(self.stage_mix, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.stage_mix, "load_state_dict"):
            self.stage_mix.load_state_dict(state)


@dataclass
class ExampleClasses:
    """What the batcher chooses between: (stage, unit) pairs with their segment tokens and mix."""

    stages: list[int]
    units: list[int | None]  # None: no units (images, or clips trained whole)
    segment_tokens: list[int]
    mix: object

    def name(self, c: int) -> str:
        return f"stage {self.stages[c]}" + ("" if self.units[c] is None else f" unit {self.units[c]}")


def example_classes(config) -> ExampleClasses:
    """The batcher's classes for a run Config: one per stage, or one per (stage, unit) for video units."""
    from pyraflow.batching import build_mix

    k = config.schedule.stages
    stage_mix = build_mix(config.batching.mix, k)
    vc = config.video
    if vc.unit_frames is None:
        return ExampleClasses(list(range(k)), [None] * k, config.stage_segment_tokens(), stage_mix)
    spans = unit_spans(config.data.frames, vc.unit_frames)
    frame_tokens = [v // config.data.frames for v in config.stage_visual_tokens()]
    stages, units, tokens = [], [], []
    for stage in range(k):
        for u, (_, count) in enumerate(spans):
            stages.append(stage)
            units.append(u)
            tokens.append(config.text.max_tokens + count * frame_tokens[stage]
                          + history_tokens(spans, u, stage, vc.max_history_units, frame_tokens))
    mix = UnitMix(stage_mix, unit_probabilities(len(spans), vc.image_ratio))
    return ExampleClasses(stages, units, tokens, mix)


def unit_training_samples(schedule, clean: torch.Tensor, stages: torch.Tensor, units: torch.Tensor,
                          spans: list[tuple[int, int]], config: VideoConfig, texts: list[tuple[torch.Tensor, torch.Tensor]],
                          generator: torch.Generator) -> tuple[list, list[torch.Tensor]]:
    """Training samples (with compressed, noised history) and velocity targets for one batch of unit examples.

    clean: (B, C, T, H, W) full-resolution videos; stages, units: (B,) the class of each example; texts: (tokens,
    pooled) per example. Returns samples and targets (C, F_u, h_k, w_k) in the same order (grouped by stage).
    """
    from pyraflow.packing import Sample

    levels = schedule.data_pyramid(clean)
    sigma = torch.rand(len(clean), generator=generator) * config.history_noise
    noise_levels = schedule.noise_pyramid(torch.randn(clean.shape, generator=generator))
    samples, targets = [], []
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
                samples.append(Sample(pair.stage, pair.input[j], *texts[i], pair.timestep[j], parts, spans[u][0], u))
                targets.append(pair.target[j])
    return samples, targets
