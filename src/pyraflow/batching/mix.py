"""The stage mix over training: a target ratio per stage at every step.

``MixSchedule`` is a pure function of the step (constant, piecewise or linear); ``AdaptiveMix`` leans toward
the stages whose loss improves slowest. Both answer ``ratio(step)`` and ``support()``; the batcher asks them.
"""

from __future__ import annotations

import math

import numpy as np

from pyraflow.config import MixConfig, resolve_ratio

FAST_LOSS_DECAY = 0.9  # per-observation decay of AdaptiveMix's fast loss average (recent progress)
SLOW_LOSS_DECAY = 0.99  # ... and of its slow one (the baseline that progress is measured against)


def ratio_array(value, num_stages: int, where: str = "batching.mix.ratio") -> np.ndarray:
    """resolve_ratio as a float64 array (the batcher's arithmetic is vectorised)."""
    return np.asarray(resolve_ratio(value, num_stages, where), dtype=np.float64)


class MixSchedule:
    """The target ratio as a pure function of the step (constant, piecewise or linear): no feedback, no state."""

    reads_losses = False  # the trainer hands per-stage losses (a host read) only to mixes that read them

    def __init__(self, config: MixConfig, num_stages: int):
        self.config = config
        self.num_stages = num_stages
        self._base = ratio_array(config.ratio, num_stages) if config.kind in ("constant", "adaptive") else None
        self._points: list[tuple[int, np.ndarray]] = []
        if config.kind == "piecewise":
            last = len(config.points) - 1
            previous = -1
            for i, point in enumerate(config.points):
                _check_keys(point, {"ratio", "until"}, f"batching.mix.points[{i}]")
                until = point.get("until")
                if until is None and i != last:
                    raise ValueError(f"batching.mix.points[{i}] needs 'until: STEP' (only the last may omit it).")
                until = math.inf if until is None else int(until)
                if until <= previous:
                    raise ValueError(
                        f"batching.mix.points[{i}].until={until} must be larger than the previous 'until' ({previous})."
                    )
                previous = until
                self._points.append((until, ratio_array(point["ratio"], num_stages, f"batching.mix.points[{i}].ratio")))
        elif config.kind == "linear":
            previous = -1
            for i, point in enumerate(config.points):
                _check_keys(point, {"ratio", "step"}, f"batching.mix.points[{i}]")
                if "step" not in point:
                    raise ValueError(f"batching.mix.points[{i}] needs 'step: STEP' for a linear mix.")
                step = int(point["step"])
                if step <= previous:
                    raise ValueError(
                        f"batching.mix.points[{i}].step={step} must be larger than the previous point's step ({previous})."
                    )
                previous = step
                self._points.append((step, ratio_array(point["ratio"], num_stages, f"batching.mix.points[{i}].ratio")))

    def ratio(self, step: int) -> np.ndarray:
        kind = self.config.kind
        if kind in ("constant", "adaptive"):
            return self._base
        if kind == "piecewise":
            for until, ratio in self._points:
                if step < until:
                    return ratio
            return self._points[-1][1]
        # linear
        if step <= self._points[0][0]:
            return self._points[0][1]
        for (s0, r0), (s1, r1) in zip(self._points, self._points[1:]):
            if step <= s1:
                w = (step - s0) / (s1 - s0)
                return (1 - w) * r0 + w * r1
        return self._points[-1][1]

    def observe(self, step: int, stage_losses: dict[int, float]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def support(self) -> np.ndarray:
        """Stages whose ratio is above zero at some step."""
        if self.config.kind in ("constant", "adaptive"):
            return self._base > 0
        return np.any([r > 0 for _, r in self._points], axis=0)


def _check_keys(point: dict, allowed: set[str], where: str) -> None:
    if not isinstance(point, dict):
        raise ValueError(f"{where} must be a mapping like {{ratio: ..., {sorted(allowed - {'ratio'})[0]}: ...}}.")
    unknown = set(point) - allowed
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
    if "ratio" not in point:
        raise ValueError(f"{where} needs a 'ratio'.")


class AdaptiveMix:
    """A mix that leans toward the stages whose loss is improving slowest.

    Rule (every ``adaptive_every`` batches): for each stage keep a fast and a slow exponential moving
    average of its loss (decays FAST_LOSS_DECAY and SLOW_LOSS_DECAY per observation). Progress p_k = (slow - fast) / slow is
    the recent relative improvement. With z_k = p_k / max|p|, the target is base_k * exp(-s * z_k),
    normalised; the ratio moves a fraction ``adaptive_rate`` toward it and is then projected onto
    [adaptive_min, adaptive_max] per stage (summing to 1). Stages with base ratio 0 stay at 0.

    An update computed after batch b applies from batch b + adaptive_every on. The loader plans batches ahead of
    the step; with this fixed delay, which ratio a batch gets never depends on how far ahead it was planned, so
    runs and resumes are deterministic (the delay must exceed the loader's look-ahead).
    """

    reads_losses = True

    def __init__(self, config: MixConfig, num_stages: int):
        self.config = config
        self.num_stages = num_stages
        self.base = ratio_array(config.ratio, num_stages)
        self.lower = self._bound(config.adaptive_min, "adaptive_min") * (self.base > 0)
        self.upper = self._bound(config.adaptive_max, "adaptive_max") * (self.base > 0)
        if self.lower.sum() > 1 + 1e-9 or self.upper.sum() < 1 - 1e-9 or (self.lower > self.upper).any():
            raise ValueError(
                f"batching.mix adaptive bounds min={self.lower.tolist()} max={self.upper.tolist()} leave no valid "
                "ratio: need min <= max per stage, sum(min) <= 1 <= sum(max)."
            )
        # (first batch it applies to, ratio), in order
        self.schedule: list[tuple[int, np.ndarray]] = [(0, _project(self.base.copy(), self.lower, self.upper))]
        self.fast = np.full(num_stages, np.nan)
        self.slow = np.full(num_stages, np.nan)
        self.last_update = 0

    def _bound(self, value, name: str) -> np.ndarray:
        arr = np.full(self.num_stages, float(value)) if np.isscalar(value) else np.asarray(value, dtype=np.float64)
        if arr.shape != (self.num_stages,):
            raise ValueError(f"batching.mix.{name} needs one value or {self.num_stages} values, got {value}.")
        return arr

    def ratio(self, step: int) -> np.ndarray:
        """The ratio for batch ``step``: the last update that applies by then."""
        return next(r for start, r in reversed(self.schedule) if start <= step)

    @property
    def current(self) -> np.ndarray:
        """The latest ratio computed (it may apply only to later batches)."""
        return self.schedule[-1][1]

    def support(self) -> np.ndarray:
        return self.base > 0

    def observe(self, step: int, stage_losses: dict[int, float]) -> None:
        """Feed the mean loss of each stage once ``step`` batches are done; updates the ratio on schedule."""
        for k, loss in stage_losses.items():
            if not math.isfinite(loss):
                continue
            self.fast[k] = loss if np.isnan(self.fast[k]) else FAST_LOSS_DECAY * self.fast[k] + (1 - FAST_LOSS_DECAY) * loss
            self.slow[k] = loss if np.isnan(self.slow[k]) else SLOW_LOSS_DECAY * self.slow[k] + (1 - SLOW_LOSS_DECAY) * loss
        if step - self.last_update < self.config.adaptive_every or np.isnan(self.slow[self.base > 0]).any():
            return
        self.last_update = step
        active = self.base > 0
        progress = np.zeros(self.num_stages)
        progress[active] = (self.slow[active] - self.fast[active]) / np.maximum(np.abs(self.slow[active]), 1e-12)
        scale = np.abs(progress[active]).max()
        z = progress / scale if scale > 0 else progress
        target = self.base * np.exp(-self.config.adaptive_sensitivity * z)
        target /= target.sum()
        rate = self.config.adaptive_rate
        updated = _project((1 - rate) * self.current + rate * target, self.lower, self.upper)
        self.schedule.append((step + self.config.adaptive_every, updated))

    def state_dict(self) -> dict:
        return {
            "schedule": [(start, r.tolist()) for start, r in self.schedule],
            "fast": self.fast.tolist(),
            "slow": self.slow.tolist(),
            "last_update": self.last_update,
        }

    def load_state_dict(self, state: dict) -> None:
        self.schedule = [(int(start), np.asarray(r, dtype=np.float64)) for start, r in state["schedule"]]
        self.fast = np.asarray(state["fast"], dtype=np.float64)
        self.slow = np.asarray(state["slow"], dtype=np.float64)
        self.last_update = int(state["last_update"])


def _project(ratio: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Closest-in-spirit point of {lower <= x <= upper, sum x = 1}: clip, then spread the excess or
    shortfall over the entries still free to move, proportionally to their room."""
    x = np.clip(ratio, lower, upper)
    for _ in range(2 * len(x) + 2):
        gap = 1.0 - x.sum()
        if abs(gap) < 1e-12:
            break
        room = (upper - x) if gap > 0 else (x - lower)
        if room.sum() <= 0:
            break
        x = np.clip(x + gap * room / room.sum(), lower, upper)
    return x


def build_mix(config: MixConfig, num_stages: int) -> MixSchedule | AdaptiveMix:
    return AdaptiveMix(config, num_stages) if config.kind == "adaptive" else MixSchedule(config, num_stages)
