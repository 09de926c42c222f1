"""What the batcher chooses between: example classes with their segment lengths and target mix.

A class is a stage, a shape bucket and, for video trained unit by unit, a unit: an image run on one square size
has one class per stage; with aspect or clip-length buckets every (stage, bucket) is a class, with its own tokens
and its own pool of samples; a later video unit brings its history, so its segment is longer. The stage mix is
spread over each stage's classes: bucket b gets the share of the data it holds, unit u ``unit_probabilities``.
Classes are ordered stage-major, then bucket, then unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyraflow.batching.mix import build_mix
from pyraflow.config import Bucket, Config, unit_spans
from pyraflow.video import history_tokens


def frame_tokens(config: Config, stage: int, bucket: Bucket | None = None) -> int:
    """Visual tokens of one frame at ``stage`` (of the bucket's size; default the square size)."""
    p, k = config.model.patch_size, config.schedule.stages
    side = p * 2 ** (k - 1 - stage) * config.latent.resolved_downsample()
    if bucket is None:
        return (config.latent_size() // (p * 2 ** (k - 1 - stage))) ** 2
    return (bucket.height // side) * (bucket.width // side)


def segment_tokens(config: Config, stage: int, unit: int | None = None, bucket: Bucket | None = None) -> int:
    """Tokens one example brings to a batch: text (budgeted at text.max_tokens) + visual tokens of what it
    predicts + those of its history (video units)."""
    per_frame = [frame_tokens(config, k, bucket) for k in range(config.schedule.stages)]
    frames = config.data.frames if bucket is None else bucket.frames
    text = config.text.max_tokens
    if unit is None:
        return text + frames * per_frame[stage]
    spans = unit_spans(frames, config.video.unit_frames)
    return (text + spans[unit][1] * per_frame[stage]
            + history_tokens(spans, unit, stage, config.video.max_history_units, per_frame))


def unit_probabilities(num_units: int, image_ratio: float) -> np.ndarray:
    """How training examples spread over units 0..num_units-1 (unit 0: the first frame alone)."""
    if num_units == 1:
        return np.ones(1)
    rest = (1 - image_ratio) / (num_units - 1)
    return np.asarray([image_ratio] + [rest] * (num_units - 1))


class ClassMix:
    """A stage mix spread over classes: class c gets ratio[stage of c] * weight[c], the weights of each stage's
    classes summing to 1. Loss feedback and state go to the stage mix."""

    def __init__(self, stage_mix, class_stages: list[int], weights: np.ndarray):
        self.stage_mix = stage_mix
        self.class_stages = np.asarray(class_stages)
        self.weights = np.asarray(weights, dtype=np.float64)

    def ratio(self, step: int) -> np.ndarray:
        return self.stage_mix.ratio(step)[self.class_stages] * self.weights

    def support(self) -> np.ndarray:
        return self.stage_mix.support()[self.class_stages] & (self.weights > 0)

    @property
    def reads_losses(self) -> bool:
        return self.stage_mix.reads_losses

    def observe(self, step: int, stage_losses: dict[int, float]) -> None:
        self.stage_mix.observe(step, stage_losses)

    def state_dict(self) -> dict:
        return self.stage_mix.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stage_mix.load_state_dict(state)


@dataclass
class ExampleClasses:
    """The batcher's classes: the stage, bucket and unit of each, its segment tokens, and the mix over them."""

    stages: list[int]
    units: list[int | None]  # None: no units (images, or clips trained whole)
    segment_tokens: list[int]
    mix: object
    buckets: list[int]  # index into bucket_shapes: also the class's pool of samples
    bucket_shapes: list[Bucket]

    def name(self, c: int) -> str:
        bucket = "" if len(self.bucket_shapes) == 1 else f" {self.bucket_shapes[self.buckets[c]].name}"
        return f"stage {self.stages[c]}{bucket}" + ("" if self.units[c] is None else f" unit {self.units[c]}")

    def names(self) -> list[str]:
        return [self.name(c) for c in range(len(self.stages))]


def example_classes(config: Config, buckets: list[Bucket] | None = None,
                    bucket_counts: list[int] | None = None) -> ExampleClasses:
    """The batcher's classes for a run. buckets: the run's shapes (default Config.buckets()); bucket_counts: samples
    per bucket in the data, which sets each bucket's share (default: equal shares)."""
    k = config.schedule.stages
    stage_mix = build_mix(config.batching.mix, k)
    buckets = buckets or config.buckets()
    counts = np.asarray(bucket_counts if bucket_counts is not None else [1] * len(buckets), dtype=np.float64)
    if counts.shape != (len(buckets),):
        raise ValueError(f"{len(counts)} bucket counts for {len(buckets)} buckets.")
    shares = counts / counts.sum() if counts.sum() > 0 else np.full(len(buckets), 1 / len(buckets))
    units = config.video_units()
    shaped = config.data.bucketed  # tokens from the bucket's sides; otherwise from data.image_size
    if len(buckets) == 1 and not units:  # one class per stage, the stage mix as it is
        tokens = [segment_tokens(config, s, None, buckets[0] if shaped else None) for s in range(k)]
        return ExampleClasses(list(range(k)), [None] * k, tokens, stage_mix, [0] * k, list(buckets))
    stages, class_units, class_buckets, tokens, weights = [], [], [], [], []
    for s in range(k):
        for b, bucket in enumerate(buckets):
            if units:
                probs = unit_probabilities(len(unit_spans(bucket.frames, config.video.unit_frames)), config.video.image_ratio)
            else:
                probs = [1.0]
            for u, prob in enumerate(probs):
                stages.append(s)
                class_units.append(u if units else None)
                class_buckets.append(b)
                tokens.append(segment_tokens(config, s, u if units else None, bucket if shaped else None))
                weights.append(shares[b] * prob)
    return ExampleClasses(stages, class_units, tokens, ClassMix(stage_mix, stages, np.asarray(weights)), class_buckets,
                          list(buckets))
