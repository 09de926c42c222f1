"""Stage mix and token-budget batching: which stages go into each step, and how many samples of each.

Stages differ 4x in tokens per halving, so a fixed number of samples per batch makes memory swing.
Here every batch is filled up to a token budget instead, and the per-stage sample counts follow a
target mix (a ratio per stage, possibly changing over training) with a carried deficit, so the
realised mix tracks the target with an error that stays bounded instead of growing like a random walk.

The choice is deterministic: given the carried state, step k's counts are a pure function of the mix
at step k. Every rank computes the same counts (so every rank holds the same number of tokens) and
reads different samples from its own shard of a per-epoch permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

MIX_KINDS = ("constant", "piecewise", "linear", "adaptive")
RATIO_UNITS = ("samples", "tokens")


def ratio_presets(num_stages: int) -> dict[str, list[float]]:
    presets = {"uniform": [1.0 / num_stages] * num_stages}
    if num_stages == 3:
        presets["25-50-25"] = [0.25, 0.5, 0.25]
    return presets


def resolve_ratio(value: str | list[float], num_stages: int, where: str = "batching.mix.ratio") -> np.ndarray:
    """A preset name or a list of non-negative reals summing to 1 -> float64 array of length K."""
    if isinstance(value, str):
        presets = ratio_presets(num_stages)
        if value not in presets:
            extra = "" if num_stages == 3 else " ('25-50-25' needs exactly 3 stages)"
            raise ValueError(
                f"{where}={value!r} is not a preset for {num_stages} stages; use one of "
                f"{', '.join(presets)} or a list of {num_stages} ratios{extra}."
            )
        return np.asarray(presets[value], dtype=np.float64)
    ratio = np.asarray([float(v) for v in value], dtype=np.float64)
    if ratio.shape != (num_stages,):
        raise ValueError(
            f"{where}={list(value)} has {ratio.size} entries but the schedule has {num_stages} stages; "
            f"give one ratio per stage (e.g. {ratio_presets(num_stages)['uniform']})."
        )
    if (ratio < 0).any() or not np.isfinite(ratio).all():
        raise ValueError(f"{where}={list(value)} has a negative or non-finite entry; ratios must be >= 0.")
    if abs(ratio.sum() - 1.0) > 1e-6:
        raise ValueError(f"{where}={list(value)} sums to {ratio.sum():.6g}; ratios must sum to 1.")
    return ratio / ratio.sum()


@dataclass
class MixConfig:
    """The stage mix over training.

    kind:
      - ``constant``: ``ratio`` at every step.
      - ``piecewise``: ``points`` is a list of ``{ratio: ..., until: STEP}``; each ratio holds until its
        step (exclusive); the last may omit ``until`` and then holds forever.
      - ``linear``: ``points`` is a list of ``{step: STEP, ratio: ...}``; the ratio moves linearly between
        consecutive points and stays at the first/last point outside them.
      - ``adaptive``: starts at ``ratio`` and moves it toward the stages whose loss improves slowest
        (see AdaptiveMix for the rule), within ``adaptive_min`` .. ``adaptive_max`` per stage.
    """

    kind: str = "constant"
    ratio: list[float] | str = "25-50-25"
    points: list[dict] = field(default_factory=list)
    adaptive_rate: float = 0.05
    """Fraction of the way the ratio moves toward the adaptive target at each update."""
    adaptive_every: int = 50
    """Steps between adaptive updates."""
    adaptive_sensitivity: float = 1.0
    """How strongly slow-improving stages are favoured: the target weight is base * exp(-s * z) with z in [-1, 1]."""
    adaptive_min: list[float] | float = 0.1
    adaptive_max: list[float] | float = 0.7

    def __post_init__(self) -> None:
        if self.kind not in MIX_KINDS:
            raise ValueError(f"batching.mix.kind={self.kind!r} is unknown; use one of {', '.join(MIX_KINDS)}.")
        if self.kind in ("piecewise", "linear") and not self.points:
            example = (
                "[{ratio: [0.5, 0.3, 0.2], until: 1000}, {ratio: 25-50-25}]"
                if self.kind == "piecewise"
                else "[{step: 0, ratio: [0.5, 0.3, 0.2]}, {step: 2000, ratio: 25-50-25}]"
            )
            raise ValueError(f"batching.mix.kind={self.kind} needs batching.mix.points, e.g. {example}.")
        if not 0 < self.adaptive_rate <= 1:
            raise ValueError(f"batching.mix.adaptive_rate={self.adaptive_rate} must be in (0, 1].")
        if self.adaptive_every < 1:
            raise ValueError(f"batching.mix.adaptive_every={self.adaptive_every} must be >= 1.")


class MixSchedule:
    """The target ratio as a pure function of the step (constant, piecewise or linear)."""

    def __init__(self, config: MixConfig, num_stages: int):
        self.config = config
        self.num_stages = num_stages
        self._base = resolve_ratio(config.ratio, num_stages) if config.kind in ("constant", "adaptive") else None
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
                self._points.append((until, resolve_ratio(point["ratio"], num_stages, f"batching.mix.points[{i}].ratio")))
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
                self._points.append((step, resolve_ratio(point["ratio"], num_stages, f"batching.mix.points[{i}].ratio")))

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

    Rule (every ``adaptive_every`` steps): for each stage keep a fast and a slow exponential moving
    average of its loss (decays 0.9 and 0.99 per observation). Progress p_k = (slow - fast) / slow is
    the recent relative improvement. With z_k = p_k / max|p|, the target is base_k * exp(-s * z_k),
    normalised; the ratio moves a fraction ``adaptive_rate`` toward it and is then projected onto
    [adaptive_min, adaptive_max] per stage (summing to 1). Stages with base ratio 0 stay at 0.
    """

    def __init__(self, config: MixConfig, num_stages: int):
        self.config = config
        self.num_stages = num_stages
        self.base = resolve_ratio(config.ratio, num_stages)
        self.lower = self._bound(config.adaptive_min, "adaptive_min") * (self.base > 0)
        self.upper = self._bound(config.adaptive_max, "adaptive_max") * (self.base > 0)
        if self.lower.sum() > 1 + 1e-9 or self.upper.sum() < 1 - 1e-9 or (self.lower > self.upper).any():
            raise ValueError(
                f"batching.mix adaptive bounds min={self.lower.tolist()} max={self.upper.tolist()} leave no valid "
                "ratio: need min <= max per stage, sum(min) <= 1 <= sum(max)."
            )
        self.current = _project(self.base.copy(), self.lower, self.upper)
        self.fast = np.full(num_stages, np.nan)
        self.slow = np.full(num_stages, np.nan)
        self.last_update = 0

    def _bound(self, value, name: str) -> np.ndarray:
        arr = np.full(self.num_stages, float(value)) if np.isscalar(value) else np.asarray(value, dtype=np.float64)
        if arr.shape != (self.num_stages,):
            raise ValueError(f"batching.mix.{name} needs one value or {self.num_stages} values, got {value}.")
        return arr

    def ratio(self, step: int) -> np.ndarray:
        return self.current

    def support(self) -> np.ndarray:
        return self.base > 0

    def observe(self, step: int, stage_losses: dict[int, float]) -> None:
        """Feed the mean loss of each stage seen at ``step``; updates the ratio on schedule."""
        for k, loss in stage_losses.items():
            if not math.isfinite(loss):
                continue
            self.fast[k] = loss if np.isnan(self.fast[k]) else 0.9 * self.fast[k] + 0.1 * loss
            self.slow[k] = loss if np.isnan(self.slow[k]) else 0.99 * self.slow[k] + 0.01 * loss
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
        self.current = _project((1 - rate) * self.current + rate * target, self.lower, self.upper)

    def state_dict(self) -> dict:
        return {
            "current": self.current.tolist(),
            "fast": self.fast.tolist(),
            "slow": self.slow.tolist(),
            "last_update": self.last_update,
        }

    def load_state_dict(self, state: dict) -> None:
        self.current = np.asarray(state["current"], dtype=np.float64)
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


@dataclass
class BatchingConfig:
    """Token-budget batches with a stage mix."""

    token_budget: int = 2048
    """Tokens per batch per rank (visual + text, plus the attention term below). Every batch is filled
    close to this and never above it."""
    mix: MixConfig = field(default_factory=MixConfig)
    ratio_unit: str = "samples"
    """What a mix ratio counts: ``samples`` (as the reference: 25/50/25 means a quarter of the samples are
    stage 0) or ``tokens`` (a quarter of the tokens are stage 0, so far more stage-0 samples)."""
    attention_cost: float = 0.0
    """Extra cost per token per token of segment length: a segment of L tokens costs L + attention_cost * L**2.
    About 1 / (6 * model width) makes attention FLOPs count like the linear layers' FLOPs."""
    batch_multiple: int = 1
    """The number of samples in a batch is a multiple of this."""
    max_samples: int = 1024
    """At most this many samples in one batch, whatever the budget allows."""
    seed: int = 0
    """Seed of the per-epoch data permutation."""

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise ValueError(f"batching.token_budget={self.token_budget} must be a positive number of tokens.")
        if self.ratio_unit not in RATIO_UNITS:
            raise ValueError(f"batching.ratio_unit={self.ratio_unit!r} must be one of {', '.join(RATIO_UNITS)}.")
        if self.attention_cost < 0:
            raise ValueError(f"batching.attention_cost={self.attention_cost} must be >= 0.")
        if self.batch_multiple < 1:
            raise ValueError(f"batching.batch_multiple={self.batch_multiple} must be >= 1.")
        if self.max_samples < self.batch_multiple:
            raise ValueError(
                f"batching.max_samples={self.max_samples} is below batching.batch_multiple={self.batch_multiple}."
            )


@dataclass
class StageBatch:
    """One rank's batch: which samples, at which stage."""

    step: int
    sample_ids: list[int]
    stages: list[int]  # class of each sample (its stage, or its (stage, unit) class for video), aligned with sample_ids
    counts: list[int]  # samples per stage
    tokens: int  # budgeted tokens (segment lengths; the attention term excluded)
    cost: float  # tokens plus the attention term: what the budget bounds


class TokenBudgetBatcher:
    """Chooses each step's per-stage sample counts under a token budget and hands out sample ids.

    segment_tokens[k] is the number of tokens one stage-k sample brings (visual + text). For video units the
    "stages" are classes, one per (stage, unit) pair (see pyraflow.video.example_classes). The carried
    state is (step, the cumulative target and assigned amounts per stage, samples consumed); it is the
    same on every rank, so rank 0 can save it for all.
    """

    def __init__(
        self,
        config: BatchingConfig,
        segment_tokens: list[int],
        mix: MixSchedule | AdaptiveMix,
        dataset_size: int,
        rank: int = 0,
        world_size: int = 1,
        class_names: list[str] | None = None,
    ):
        self.config = config
        self.class_names = class_names or [f"stage {k}" for k in range(len(segment_tokens))]
        self.segment_tokens = np.asarray(segment_tokens, dtype=np.int64)
        self.num_stages = len(segment_tokens)
        self.cost = self.segment_tokens + config.attention_cost * self.segment_tokens.astype(np.float64) ** 2
        self.mix = mix
        self.rank, self.world_size = rank, world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size}).")
        support = mix.support()
        if dataset_size < world_size or dataset_size <= 0:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than the {world_size} rank(s); every stage with a "
                "ratio above zero needs data. Point data at a non-empty dataset or lower the number of ranks."
            )
        largest = float(self.cost[support].max())
        if largest > config.token_budget:
            k = int(np.flatnonzero(support & (self.cost == largest))[0])
            raise ValueError(
                f"batching.token_budget={config.token_budget} is below one sample of {self.class_names[k]} "
                f"({largest:g} tokens); raise the budget to at least {math.ceil(largest)} or give that stage a ratio of 0."
            )
        positive_costs = self.cost[support & (self.cost > 0)]
        self.max_batch = int(min(config.max_samples, config.token_budget // positive_costs.min()))
        self.shard_size = dataset_size // world_size  # per epoch; drops < world_size samples, different ones each epoch
        self.dataset_size = dataset_size
        self.step = 0
        self.target = np.zeros(self.num_stages)
        self.assigned = np.zeros(self.num_stages)
        self.consumed = 0
        self._permutation_cache: tuple[int, torch.Tensor] | None = None

    # ----- stage counts --------------------------------------------------------------------------
    def _counts(self, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy fill: add the most-owed stage that still fits until nothing fits (or max_samples)."""
        cfg = self.config
        unit = np.ones(self.num_stages) if cfg.ratio_unit == "samples" else self.segment_tokens.astype(np.float64)
        target, assigned = self.target.copy(), self.assigned.copy()
        remaining = float(cfg.token_budget)
        order: list[int] = []
        active = ratio > 0
        while len(order) < cfg.max_samples:
            fits = active & (self.cost <= remaining + 1e-9)
            if not fits.any():
                break
            owed = np.where(fits, target - assigned + ratio * unit, -np.inf)
            k = int(np.argmax(owed))
            target += ratio * unit[k]
            assigned[k] += unit[k]
            remaining -= self.cost[k]
            order.append(k)
        while len(order) % cfg.batch_multiple:
            k = order.pop()
            target -= ratio * unit[k]
            assigned[k] -= unit[k]
        counts = np.bincount(np.asarray(order, dtype=np.int64), minlength=self.num_stages)
        return counts, target, assigned

    def peek_counts(self, step: int | None = None) -> np.ndarray:
        step = self.step if step is None else step
        return self._counts(self.mix.ratio(step))[0]

    # ----- data order --------------------------------------------------------------------------
    def _raw_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=g)[: self.shard_size * self.world_size]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation, with its first window kept clear of the previous epoch's last window.

        A step that straddles two epochs takes the end of epoch e and the start of e+1 on every rank; without
        this, one sample could land on two ranks (or twice on one) in that step. The tail is left as drawn,
        so each epoch depends only on its own and the previous draw.
        """
        order = self._raw_order(epoch)
        window = self.max_batch * self.world_size
        if epoch == 0 or len(order) < 3 * window:
            return order
        previous_tail = self._raw_order(epoch - 1)[-window:]
        body, tail = order[:-window], order[-window:]
        clash = torch.isin(body, previous_tail)
        if not clash.any():
            return order
        free = body[~clash]
        return torch.cat([free[:window], body[clash], free[window:], tail])

    def _shard(self, epoch: int) -> torch.Tensor:
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            self._permutation_cache = (epoch, self._epoch_order(epoch)[self.rank :: self.world_size])
        return self._permutation_cache[1]

    def _take(self, n: int) -> list[int]:
        ids: list[int] = []
        position = self.consumed
        while len(ids) < n:
            epoch, offset = divmod(position, self.shard_size)
            shard = self._shard(epoch)
            chunk = shard[offset : offset + n - len(ids)].tolist()
            ids.extend(chunk)
            position += len(chunk)
        return ids

    def epoch(self) -> int:
        return self.consumed // self.shard_size

    # ----- stepping ----------------------------------------------------------------------------
    def next_batch(self) -> StageBatch:
        counts, self.target, self.assigned = self._counts(self.mix.ratio(self.step))
        n = int(counts.sum())
        ids = self._take(n)
        self.consumed += n
        stages = [k for k in range(self.num_stages) for _ in range(int(counts[k]))]
        batch = StageBatch(
            step=self.step,
            sample_ids=ids,
            stages=stages,
            counts=counts.tolist(),
            tokens=int((counts * self.segment_tokens).sum()),
            cost=float((counts * self.cost).sum()),
        )
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "target": self.target.tolist(),
            "assigned": self.assigned.tolist(),
            "consumed": self.consumed,
            "dataset_size": self.dataset_size,
            "world_size": self.world_size,
        }
        if hasattr(self.mix, "state_dict"):
            state["adaptive_mix"] = self.mix.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["dataset_size"] != self.dataset_size or state["world_size"] != self.world_size:
            raise ValueError(
                f"batcher state was saved for {state['dataset_size']} samples on {state['world_size']} rank(s), "
                f"but this run has {self.dataset_size} samples on {self.world_size}; resume with the same data "
                "and number of ranks, or start a new run."
            )
        self.step = int(state["step"])
        self.target = np.asarray(state["target"], dtype=np.float64)
        self.assigned = np.asarray(state["assigned"], dtype=np.float64)
        self.consumed = int(state["consumed"])
        if "adaptive_mix" in state and hasattr(self.mix, "load_state_dict"):
            self.mix.load_state_dict(state["adaptive_mix"])
