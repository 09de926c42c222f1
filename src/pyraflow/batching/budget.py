"""Token-budget batching: which classes (stages, or (stage, unit) pairs for video) go into each step, and
how many samples of each.

Stages differ 4x in tokens per halving, so a fixed number of samples per batch makes memory swing.
Here every batch is filled up to a token budget instead, and the per-class sample counts follow a
target mix (a ratio per class, possibly changing over training) with a carried deficit, so the
realised mix tracks the target with an error that stays bounded instead of growing like a random walk.

The choice is deterministic: given the carried state, step k's counts are a pure function of the mix
at step k. Every rank computes the same counts (so every rank holds the same number of tokens) and
reads different samples from its own shard of a per-epoch permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pyraflow.config import BatchingConfig

EPOCH_SEED_STRIDE = 1_000_003  # a prime: seeds of (batching.seed, epoch) pairs never collide for epochs below it
POOL_SEED_SHIFT = 40  # pools (buckets) after the first get their own high bits in the permutation seed


@dataclass
class ClassBatch:
    """One rank's batch: which samples, of which class."""

    step: int
    sample_ids: list[int]
    classes: list[int]  # class of each sample (its stage, or its (stage, unit) class for video), aligned with sample_ids
    counts: list[int]  # samples per class
    tokens: int  # budgeted tokens (segment lengths; the attention term excluded)
    cost: float  # tokens plus the attention term: what the budget bounds


class TokenBudgetBatcher:
    """Chooses each step's per-class sample counts under a token budget and hands out sample ids.

    segment_tokens[c] is the number of tokens one sample of class c brings (visual + text); a class is a stage,
    or a (stage, bucket[, unit]) combination (see pyraflow.batching.example_classes). Samples come from pools
    (one per shape bucket; one for the whole dataset without buckets): class c takes its samples from pool
    class_pools[c], each pool walks its own per-epoch permutation, and pool_ids(pool, local indices) turns them
    into dataset ids. The carried state is (step, the cumulative target and assigned amounts per class, samples
    consumed per pool); it is the same on every rank, so rank 0 can save it for all.
    """

    def __init__(
        self,
        config: BatchingConfig,
        segment_tokens: list[int],
        mix,
        dataset_size: int | list[int],
        rank: int = 0,
        world_size: int = 1,
        class_names: list[str] | None = None,
        class_pools: list[int] | None = None,
        pool_ids: Callable[[int, list[int]], list[int]] | None = None,
    ):
        self.config = config
        self.class_names = class_names or [f"stage {k}" for k in range(len(segment_tokens))]
        self.segment_tokens = np.asarray(segment_tokens, dtype=np.int64)
        self.num_classes = len(segment_tokens)
        self.cost = self.segment_tokens + config.attention_cost * self.segment_tokens.astype(np.float64) ** 2
        self.mix = mix
        self.rank, self.world_size = rank, world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size}).")
        support = mix.support()
        self.pool_sizes = [dataset_size] if isinstance(dataset_size, int) else list(dataset_size)
        self.class_pools = list(class_pools) if class_pools is not None else [0] * self.num_classes
        self.pool_ids = pool_ids or (lambda pool, local: list(local))
        for pool, size in enumerate(self.pool_sizes):
            used = [c for c in range(self.num_classes) if self.class_pools[c] == pool and support[c]]
            if used and (size < world_size or size <= 0):
                where = "the dataset" if len(self.pool_sizes) == 1 else f"bucket {pool} (used by {self.class_names[used[0]]})"
                raise ValueError(
                    f"{where} has {size} samples, fewer than the {world_size} rank(s); every class with a "
                    "ratio above zero needs data. Point data at a non-empty dataset or lower the number of ranks."
                )
        largest = float(self.cost[support].max())
        if largest > config.token_budget:
            k = int(np.flatnonzero(support & (self.cost == largest))[0])
            raise ValueError(
                f"batching.token_budget={config.token_budget} is below one sample of {self.class_names[k]} "
                f"({largest:g} tokens); raise the budget to at least {math.ceil(largest)} or give that class a ratio of 0."
            )
        positive_costs = self.cost[support & (self.cost > 0)]
        self.max_batch = int(min(config.max_samples, config.token_budget // positive_costs.min()))
        # per pool and epoch; drops < world_size samples of a pool, different ones each epoch
        self.shard_sizes = [size // world_size for size in self.pool_sizes]
        self.dataset_size = sum(self.pool_sizes)
        self.step = 0
        self.target = np.zeros(self.num_classes)
        self.assigned = np.zeros(self.num_classes)
        self.consumed = [0] * len(self.pool_sizes)
        self._permutation_cache: dict[int, tuple[int, torch.Tensor]] = {}

    # ----- class counts --------------------------------------------------------------------------
    def _counts(self, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Greedy fill: add the most-owed class that still fits until nothing fits (or max_samples)."""
        cfg = self.config
        unit = np.ones(self.num_classes) if cfg.ratio_unit == "samples" else self.segment_tokens.astype(np.float64)
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
        counts = np.bincount(np.asarray(order, dtype=np.int64), minlength=self.num_classes)
        return counts, target, assigned

    def peek_counts(self, step: int | None = None) -> np.ndarray:
        step = self.step if step is None else step
        return self._counts(self.mix.ratio(step))[0]

    # ----- data order --------------------------------------------------------------------------
    def _raw_order(self, epoch: int, pool: int) -> torch.Tensor:
        seed = (self.config.seed * EPOCH_SEED_STRIDE + epoch) ^ (pool << POOL_SEED_SHIFT)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(self.pool_sizes[pool], generator=g)[: self.shard_sizes[pool] * self.world_size]

    def _epoch_order(self, epoch: int, pool: int) -> torch.Tensor:
        """The epoch's permutation of a pool, with its first window kept clear of the previous epoch's last window.

        A step that straddles two epochs takes the end of epoch e and the start of e+1 on every rank; without
        this, one sample could land on two ranks (or twice on one) in that step. The tail is left as drawn,
        so each epoch depends only on its own and the previous draw.
        """
        order = self._raw_order(epoch, pool)
        window = self.max_batch * self.world_size
        if epoch == 0 or len(order) < 3 * window:
            return order
        previous_tail = self._raw_order(epoch - 1, pool)[-window:]
        body, tail = order[:-window], order[-window:]
        clash = torch.isin(body, previous_tail)
        if not clash.any():
            return order
        free = body[~clash]
        return torch.cat([free[:window], body[clash], free[window:], tail])

    def _shard(self, epoch: int, pool: int) -> torch.Tensor:
        cached = self._permutation_cache.get(pool)
        if cached is None or cached[0] != epoch:
            self._permutation_cache[pool] = (epoch, self._epoch_order(epoch, pool)[self.rank :: self.world_size])
        return self._permutation_cache[pool][1]

    def _take(self, n: int, pool: int) -> list[int]:
        local: list[int] = []
        position = self.consumed[pool]
        while len(local) < n:
            epoch, offset = divmod(position, self.shard_sizes[pool])
            chunk = self._shard(epoch, pool)[offset : offset + n - len(local)].tolist()
            local.extend(chunk)
            position += len(chunk)
        self.consumed[pool] = position
        return self.pool_ids(pool, local)

    def epoch(self) -> int:
        """Epochs completed by every pool in use."""
        return min(c // s for c, s in zip(self.consumed, self.shard_sizes) if s)

    # ----- stepping ----------------------------------------------------------------------------
    def next_batch(self) -> ClassBatch:
        counts, self.target, self.assigned = self._counts(self.mix.ratio(self.step))
        ids: list[int] = []
        for k in range(self.num_classes):
            if counts[k]:
                ids += self._take(int(counts[k]), self.class_pools[k])
        classes = [k for k in range(self.num_classes) for _ in range(int(counts[k]))]
        batch = ClassBatch(
            step=self.step,
            sample_ids=ids,
            classes=classes,
            counts=counts.tolist(),
            tokens=int((counts * self.segment_tokens).sum()),
            cost=float((counts * self.cost).sum()),
        )
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """The batcher's own position (the mix, which learns from the step, is saved by its owner)."""
        return {
            "step": self.step,
            "target": self.target.tolist(),
            "assigned": self.assigned.tolist(),
            "consumed": list(self.consumed),
            "pool_sizes": list(self.pool_sizes),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        pools = state.get("pool_sizes", [state.get("dataset_size")])
        if pools != self.pool_sizes or state["world_size"] != self.world_size:
            raise ValueError(
                f"batcher state was saved for {sum(pools)} samples ({pools} per bucket) on {state['world_size']} "
                f"rank(s), but this run has {self.dataset_size} ({self.pool_sizes}) on {self.world_size}; resume with "
                "the same data and number of ranks, or start a new run."
            )
        self.step = int(state["step"])
        self.target = np.asarray(state["target"], dtype=np.float64)
        self.assigned = np.asarray(state["assigned"], dtype=np.float64)
        consumed = state["consumed"]
        self.consumed = [int(consumed)] if isinstance(consumed, int) else [int(c) for c in consumed]
