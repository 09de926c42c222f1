"""What the batcher chooses between: example classes with their segment lengths and target mix.

An image run has one class per stage. A video run trained unit by unit has one class per (stage, unit): a
later unit brings its history, so its segment is longer, and the stage mix is spread over units by
``unit_probabilities``. Classes are ordered stage-major (class = stage * num_units + unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyraflow.batching.mix import build_mix
from pyraflow.config import Config, unit_spans
from pyraflow.video import history_tokens


def frame_tokens(config: Config, stage: int) -> int:
    """Visual tokens of one frame at ``stage``."""
    p, k, side = config.model.patch_size, config.schedule.stages, config.latent_size()
    return (side // (p * 2 ** (k - 1 - stage))) ** 2


def segment_tokens(config: Config, stage: int, unit: int | None = None) -> int:
    """Tokens one example brings to a batch: text (budgeted at text.max_tokens) + visual tokens of what it
    predicts + those of its history (video units)."""
    per_frame = [frame_tokens(config, k) for k in range(config.schedule.stages)]
    text = config.text.max_tokens
    if unit is None:
        return text + config.data.frames * per_frame[stage]
    spans = unit_spans(config.data.frames, config.video.unit_frames)
    return (text + spans[unit][1] * per_frame[stage]
            + history_tokens(spans, unit, stage, config.video.max_history_units, per_frame))


def unit_probabilities(num_units: int, image_ratio: float) -> np.ndarray:
    """How training examples spread over units 0..num_units-1 (unit 0: the first frame alone)."""
    if num_units == 1:
        return np.ones(1)
    rest = (1 - image_ratio) / (num_units - 1)
    return np.asarray([image_ratio] + [rest] * (num_units - 1))


class UnitMix:
    """A stage mix spread over units: class (stage k, unit u) gets ratio[k] * p[u]. Loss feedback and state go to
    the stage mix."""

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
    """The batcher's classes: the stage and unit of each, its segment tokens, and the mix over them."""

    stages: list[int]
    units: list[int | None]  # None: no units (images, or clips trained whole)
    segment_tokens: list[int]
    mix: object

    def name(self, c: int) -> str:
        return f"stage {self.stages[c]}" + ("" if self.units[c] is None else f" unit {self.units[c]}")

    def names(self) -> list[str]:
        return [self.name(c) for c in range(len(self.stages))]


def example_classes(config: Config) -> ExampleClasses:
    """The batcher's classes for a run: one per stage, or one per (stage, unit) for video units."""
    k = config.schedule.stages
    stage_mix = build_mix(config.batching.mix, k)
    if not config.video_units():
        return ExampleClasses(list(range(k)), [None] * k, [segment_tokens(config, s) for s in range(k)], stage_mix)
    num_units = len(unit_spans(config.data.frames, config.video.unit_frames))
    pairs = [(s, u) for s in range(k) for u in range(num_units)]
    mix = UnitMix(stage_mix, unit_probabilities(num_units, config.video.image_ratio))
    return ExampleClasses([s for s, _ in pairs], [u for _, u in pairs],
                          [segment_tokens(config, s, u) for s, u in pairs], mix)
