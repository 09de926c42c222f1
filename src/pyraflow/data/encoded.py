"""Datasets encoded for training: latents from the latent space and caption embeddings from the text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyraflow.config import DataConfig
from pyraflow.data.datasets import RawSample, check_bad_files, iterate_samples
from pyraflow.data.sources import build_dataset


@dataclass
class EncodedData:
    """A dataset encoded for training, in memory (small datasets; large ones go through ``pyraflow prepare``).

    Reads as a prepared cache does: ``latent(i)``, ``text(i)``, ``first_captions(k)``."""

    latents: torch.Tensor  # (N, C, T, h, w)
    text_tokens: torch.Tensor  # (N, L, D) zero-padded
    text_lengths: torch.Tensor  # (N,)
    pooled: torch.Tensor  # (N, D_pooled)
    ids: list[str]
    captions: list[str]
    labels: list[int | None] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return self.latents.shape[0]

    def latent(self, i: int) -> torch.Tensor:
        return self.latents[i]

    def text(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_tokens[i, : int(self.text_lengths[i])], self.pooled[i]

    def first_captions(self, k: int) -> list[str]:
        return list(dict.fromkeys(self.captions))[:k]

    @property
    def pool_sizes(self) -> list[int]:
        """One pool: every sample has the one shape."""
        return [len(self)]

    def pool_ids(self, pool: int, local: list[int]) -> list[int]:
        return list(local)


def encode_samples(samples: list[RawSample], text_encoder, latent_space, batch_size: int = 64) -> dict:
    """Encode raw samples: latents batch by batch, each distinct caption once."""
    latents = [latent_space.encode(torch.stack([s.pixels for s in samples[i : i + batch_size]]))
               for i in range(0, len(samples), batch_size)]
    captions = [s.caption for s in samples]
    unique = sorted(set(captions))
    embedded = text_encoder.encode(unique)
    where = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([where[c] for c in captions], dtype=torch.long)
    return {
        "latents": torch.cat(latents),
        "text_tokens": embedded.tokens[rows],
        "text_lengths": embedded.lengths[rows],
        "pooled": embedded.pooled[rows],
    }


def encode_dataset(config: DataConfig, text_encoder, latent_space, split: str = "train",
                   progress: bool = False) -> EncodedData:
    """Read, check and encode a whole dataset in memory (the path used without a cache; one shape only: data with
    buckets goes through a prepared cache)."""
    if config.bucketed:
        raise ValueError("data with aspect or frame buckets is read through a prepared cache: set data.cache (a run "
                         "without one prepares it in its run directory).")
    from tqdm import tqdm

    dataset = build_dataset(config, split)
    samples = list(tqdm(iterate_samples(dataset), desc=f"reading {config.dataset}", disable=not progress,
                        leave=False))
    check_bad_files(dataset, len(samples), config)
    tensors = encode_samples(samples, text_encoder, latent_space)
    return EncodedData(**tensors, ids=[s.id for s in samples], captions=[s.caption for s in samples],
                       labels=[s.label for s in samples], skipped=len(dataset.bad))

