"""The training loader: a torch DataLoader whose batch sampler is the token-budget batcher.

The batcher (in the training process) decides each batch: which samples, of which class. Workers read those
rows (``latent(i)``, ``text(i)`` of an in-memory dataset or a prepared cache) and hand them to a ``build``
callable (the training objective: examples with their targets, packed), so reading, building pairs and packing
overlap with the step. Each batch carries its index and the batcher's state right after it: a checkpoint saves
the state of the last batch the step consumed, so a resume continues exactly there, however far the workers
had read ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


class BatchPlan(list):
    """The sample ids of one batch (a list, as a DataLoader batch sampler yields), with what the batcher decided."""

    def __init__(self, sample_ids: list[int], index: int, classes: list[int], state: dict):
        super().__init__(sample_ids)
        self.index = index  # the batch's number in the run (the batcher's step)
        self.classes = classes  # class of each sample
        self.state = state  # the batcher's state after this batch


@dataclass
class LoadedBatch:
    """What a worker hands the step: the built batch (e.g. a PackedBatch) and the plan it came from."""

    batch: object
    index: int
    state: dict
    tokens: int

    def pin_memory(self) -> "LoadedBatch":
        pinned = self.batch.pin_memory() if hasattr(self.batch, "pin_memory") else self.batch
        return LoadedBatch(pinned, self.index, self.state, self.tokens)


class BatcherSampler:
    """The token-budget batcher as a DataLoader batch sampler: an endless stream of BatchPlans."""

    def __init__(self, batcher):
        self.batcher = batcher

    def __iter__(self) -> Iterator[BatchPlan]:
        while True:
            planned = self.batcher.next_batch()
            yield BatchPlan(planned.sample_ids, planned.step, planned.classes, self.batcher.state_dict())


class PlannedRows(torch.utils.data.Dataset):
    """Reads a plan's rows and builds its batch: ``build(plan, latents (one (C, T, h, w) each), captions) -> (batch,
    tokens)``."""

    def __init__(self, data, build: Callable):
        self.data, self.build = data, build

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        raise TypeError("PlannedRows reads whole batches; use it with BatcherSampler.")

    def __getitems__(self, plan: BatchPlan) -> LoadedBatch:
        latents = [self.data.latent(i) for i in plan]
        captions = [self.data.text(i) for i in plan]
        batch, tokens = self.build(plan, latents, captions)
        return LoadedBatch(batch, plan.index, plan.state, tokens)


def _unwrap(batch: LoadedBatch) -> LoadedBatch:
    return batch


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with the step's own threads


class TrainingBatches:
    """LoadedBatch objects from a DataLoader whose workers start on the first ``next`` (after a resume has loaded the
    batcher's state) and stop on ``close``, however the run ends."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self.iterator = None

    def __iter__(self) -> "TrainingBatches":
        return self

    def __next__(self) -> LoadedBatch:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        return next(self.iterator)

    def close(self) -> None:
        # persistent workers outlive the iterator (the DataLoader keeps it for reuse): stop them explicitly, the one
        # place that calls into the DataLoader's iterator
        if self.iterator is not None and hasattr(self.iterator, "_shutdown_workers"):
            self.iterator._shutdown_workers()
        self.iterator = None


def training_loader(data, batcher, build: Callable, workers: int, prefetch: int, pin_memory: bool) -> TrainingBatches:
    """Batches of ``data`` in the order ``batcher`` plans them, built by ``build`` in ``workers`` processes."""
    return TrainingBatches(torch.utils.data.DataLoader(
        PlannedRows(data, build), batch_sampler=BatcherSampler(batcher), collate_fn=_unwrap, num_workers=workers,
        prefetch_factor=prefetch if workers else None, persistent_workers=workers > 0, pin_memory=pin_memory,
        worker_init_fn=_one_thread if workers else None))


def prefetch_depth(workers: int, prefetch: int) -> int:
    """How many batches the loader may plan ahead of the one the step consumes."""
    return workers * prefetch
