"""``pyraflow prepare``: latents and text embeddings computed once, stored as safetensors shards that training
reads row by row, so a run's resident memory does not grow with the dataset.

Layout of a cache directory (version 2):
  meta.json                 what made it (dataset, image shape, text encoder, latent space, text dtype)
  shard-00000.safetensors   latents (n, C, T, h, w) float32; text_tokens (sum of lengths, D) unpadded, in the
                            text dtype; text_offsets (n + 1,) int64 row offsets into text_tokens; pooled (n, D)
  shard-00000.jsonl         one row per sample: id, latent_shape (full resolution), caption, source, label
  complete.json             written last: sample and skip counts; its presence means the cache is whole

Every file is written under a temporary name and renamed (pyraflow.storage), so an interrupted ``prepare``
leaves only whole shards; a rerun skips them and carries on. A cache made with other data, another text
encoder, latent space or layout version is refused with the difference named. ``LatentCache`` reads rows with
positioned reads (no memory map: mapped pages would count as the process's memory as an epoch touches them); a
shard that is truncated or unreadable is skipped, counted and logged, and the run goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pyraflow.config import Bucket, DataConfig
from pyraflow.data.datasets import check_bad_files, iterate_samples
from pyraflow.data.sources import build_dataset
from pyraflow.data.encoded import encode_samples
from pyraflow.storage import atomic_path, remove_partials, write_json, write_text

log = logging.getLogger("pyraflow.data")

SHARD_SIZE = 1024
VERSION = 2
TENSORS = ("latents", "text_tokens", "text_offsets", "pooled")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}
TEXT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_meta(config: DataConfig, text_identity: str, latent_identity: str, buckets: list[Bucket] | None = None) -> dict:
    return {
        "version": VERSION,
        "dataset": config.dataset,
        "path": config.path,
        "image_size": config.image_size,
        "channels": config.channels,
        "resize": config.resize,
        "frames": config.frames,
        "frame_stride": config.frame_stride,
        "text_encoder": text_identity,
        "latent_space": latent_identity,
        "text_dtype": config.text_dtype,
        "buckets": [b.name for b in buckets] if config.bucketed and buckets else None,
    }


def check_meta(directory: Path, expected: dict) -> None:
    """Refuse a cache built from other data, another text encoder or latent space, or an older layout."""
    found = json.loads((directory / "meta.json").read_text())
    if found.get("version") != expected["version"]:
        raise ValueError(
            f"the cache in {directory} has layout version {found.get('version')}, this pyraflow reads version "
            f"{expected['version']} (unpadded text, row-wise reads); prepare it again ('pyraflow prepare --out "
            f"{directory}' after deleting it, or another --out)."
        )
    differences = [f"{k}: cache has {found.get(k)!r}, config wants {v!r}" for k, v in expected.items() if found.get(k) != v]
    if differences:
        raise ValueError(
            f"the cache in {directory} was made differently ({'; '.join(differences)}). "
            "Prepare a new cache with another --out (or data.cache), or delete this one."
        )


def shard_tensors(latents: torch.Tensor, text_tokens: torch.Tensor, text_lengths: torch.Tensor, pooled: torch.Tensor,
                  text_dtype: str) -> dict[str, torch.Tensor]:
    """One shard's tensors from encoded samples with padded text (n, L, D): text unpadded and cast."""
    lengths = text_lengths.long()
    valid = torch.arange(text_tokens.shape[1])[None, :] < lengths[:, None]
    return {
        "latents": latents.float().contiguous(),
        "text_tokens": text_tokens[valid].to(TEXT_DTYPES[text_dtype]).contiguous(),
        "text_offsets": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)),
        "pooled": pooled.float().contiguous(),
    }


def manifest_row(sample_id: str, latent_shape, caption: str, source: str, label, bucket: int = 0) -> dict:
    """One line of a shard's manifest (latent_shape: the full-resolution latent's; bucket: its shape bucket, 0 without)."""
    return {"id": sample_id, "latent_shape": list(latent_shape), "caption": caption, "source": source, "label": label,
            "bucket": bucket}


def finish_cache(out: Path, samples: int, shards: int, skipped_files: list[tuple[str, str]]) -> dict:
    """Write complete.json, last: its presence marks the cache whole."""
    summary = {"samples": samples, "shards": shards, "skipped": len(skipped_files),
               "skipped_files": [{"path": p, "reason": r} for p, r in skipped_files]}
    write_json(out / "complete.json", summary)
    return summary


def write_shard(out: Path, index: int, tensors: dict[str, torch.Tensor], rows: list[dict]) -> None:
    """Publish one shard: its tensors, then its manifest (whose presence marks the shard done)."""
    from safetensors.torch import save_file

    name = f"shard-{index:05d}"
    with atomic_path(out / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_text(out / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def prepare(config: DataConfig, out: str | Path, text_encoder, latent_space, progress: bool = True,
            buckets: list[Bucket] | None = None) -> dict:
    """Build (or finish) the cache in ``out``; returns {"written": samples, "skipped": bad files, ...}. With buckets
    (Config.buckets / resolve_buckets), every shard holds samples of one bucket."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = cache_meta(config, text_encoder.identity, latent_space.identity, buckets)
    if (out / "meta.json").is_file():
        check_meta(out, meta)
    else:
        write_json(out / "meta.json", meta)
    remove_partials(out)  # a shard that was being written when a previous run stopped
    if (out / "complete.json").is_file():
        summary = json.loads((out / "complete.json").read_text())
        return {**summary, "written": 0, "reused": summary["samples"]}

    dataset = build_dataset(config, buckets=buckets)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, desc=f"prepare {config.dataset}", unit="sample", disable=not progress)
    pending: dict[int, list] = {}  # bucket -> samples waiting for a full shard
    shard, written, reused, count = 0, 0, 0, 0

    def flush(samples):
        nonlocal shard, written, reused
        if (out / f"shard-{shard:05d}.jsonl").is_file():
            reused += len(samples)
        else:
            encoded = encode_samples(samples, text_encoder, latent_space)
            tensors = shard_tensors(encoded["latents"], encoded["text_tokens"], encoded["text_lengths"],
                                    encoded["pooled"], config.text_dtype)
            rows = [manifest_row(s.id, tensors["latents"].shape[1:], s.caption, s.source, s.label, s.bucket)
                    for s in samples]
            write_shard(out, shard, tensors, rows)
            written += len(samples)
        shard += 1

    for sample in iterate_samples(dataset):
        waiting = pending.setdefault(sample.bucket, [])
        waiting.append(sample)
        count += 1
        bar.update(1)
        if len(waiting) == SHARD_SIZE:
            flush(pending.pop(sample.bucket))
    for bucket in sorted(pending):
        flush(pending[bucket])
    bar.close()
    check_bad_files(dataset, count, config)
    summary = finish_cache(out, count, shard, dataset.bad)
    return {**summary, "written": written, "reused": reused}


# ----- reading ---------------------------------------------------------------------------------------

@dataclass
class TensorSpan:
    """Where one tensor of a safetensors file lies: byte offset of its data, dtype and shape."""

    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> dict[str, TensorSpan]:
    """The tensors of a safetensors file, checked against the file's size (a truncated file fails here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_bytes,) = struct.unpack("<Q", raw)
        if header_bytes > size - 8:
            raise ValueError(f"header of {header_bytes} bytes in a file of {size}")
        header = json.loads(f.read(header_bytes))
    spans, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {entry['dtype']}")
        first, last = entry["data_offsets"]
        spans[name] = TensorSpan(8 + header_bytes + first, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        end = max(end, last)
    if 8 + header_bytes + end != size:
        raise ValueError(f"{size} bytes, but its header describes {8 + header_bytes + end}")
    return spans


class Shard:
    """One shard's positions; rows are read with os.pread from a descriptor opened per process."""

    def __init__(self, path: Path, rows: int, latent_shape: tuple[int, ...] | None, bucket: int = 0):
        spans = read_header(path)
        missing = [name for name in TENSORS if name not in spans]
        if missing:
            raise ValueError(f"no {', '.join(missing)} (written by an older pyraflow?)")
        self.path, self.spans = path, spans
        self._fd: tuple[int, int] | None = None  # (pid, descriptor): a DataLoader worker opens its own
        n = spans["latents"].shape[0]
        if n != rows or spans["text_offsets"].shape != (n + 1,) or spans["pooled"].shape[0] != n:
            raise ValueError(f"{n} latents, {spans['pooled'].shape[0]} pooled vectors, {rows} manifest rows")
        if latent_shape is not None and spans["latents"].shape[1:] != tuple(latent_shape):
            raise ShapeMismatch(spans["latents"].shape[1:])
        self.rows, self.bucket = n, bucket
        self.text_offsets = self._read("text_offsets", 0, n + 1).numpy()
        if self.text_offsets[-1] != spans["text_tokens"].shape[0]:
            raise ValueError("text offsets do not match the text tokens")

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return self._fd[1]

    def _read(self, name: str, first: int, last: int) -> torch.Tensor:
        span = self.spans[name]
        count = last - first
        if count <= 0:
            return torch.empty((0, *span.shape[1:]), dtype=span.dtype)
        data = os.pread(self._descriptor(), count * span.row_bytes, span.start + first * span.row_bytes)
        if len(data) != count * span.row_bytes:
            raise OSError(f"{self.path}: short read of {name} rows {first}..{last}")
        return torch.frombuffer(bytearray(data), dtype=span.dtype).reshape(count, *span.shape[1:])

    def latent(self, row: int) -> torch.Tensor:
        return self._read("latents", row, row + 1)[0]

    def text(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._read("text_tokens", int(self.text_offsets[row]), int(self.text_offsets[row + 1]))
        return tokens.float(), self._read("pooled", row, row + 1)[0]

    def __getstate__(self) -> dict:  # a spawned worker opens its own descriptor
        return {**self.__dict__, "_fd": None}


class ShapeMismatch(ValueError):
    pass


class LatentCache:
    """A prepared cache, read row by row: ``latent(i)``, ``text(i)``, ``first_captions(k)``; nothing per sample is
    held in memory beyond each shard's text offsets (8 bytes a sample). Samples of a bucket form a pool
    (``pool_sizes``, ``pool_ids``), since a batch takes each class's samples from its bucket."""

    def __init__(self, directory: str | Path, config: DataConfig, text_identity: str, latent_identity: str,
                 latent_shapes: list[tuple[int, ...]] | None = None, buckets: list[Bucket] | None = None):
        directory = Path(directory)
        if not (directory / "complete.json").is_file():
            raise ValueError(f"{directory} is not a finished cache (no complete.json); run 'pyraflow prepare --out {directory}'.")
        check_meta(directory, cache_meta(config, text_identity, latent_identity, buckets))
        self.directory = directory
        self.shards: list[Shard] = []
        self.manifests: list[Path] = []
        self.bad_shards: list[tuple[str, int, str]] = []  # (file, samples lost, reason)
        for manifest in sorted(directory.glob("shard-*.jsonl")):
            lines = [line for line in manifest.read_text().splitlines() if line.strip()]
            bucket = json.loads(lines[0]).get("bucket", 0) if lines else 0
            shard_file = manifest.with_suffix(".safetensors")
            expected = None if latent_shapes is None else tuple(latent_shapes[min(bucket, len(latent_shapes) - 1)])
            try:
                shard = Shard(shard_file, len(lines), expected, bucket)
            except ShapeMismatch as err:
                raise ValueError(
                    f"{shard_file} holds latents of shape {tuple(err.args[0])} but the config expects {expected} "
                    "(channels, frames, height, width); prepare the cache again for this config.") from None
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
                self.bad_shards.append((str(shard_file), len(lines), f"{type(err).__name__}: {err}"))
                log.warning("skipped %s (%d samples): %s", shard_file, len(lines), err)
                continue
            self.shards.append(shard)
            self.manifests.append(manifest)
        summary = json.loads((directory / "complete.json").read_text())
        self.skipped = summary["skipped"]
        self.skipped_samples = sum(n for _, n, _ in self.bad_shards)
        if not self.shards:
            raise ValueError(f"no readable shard in {directory} ({len(self.bad_shards)} bad); prepare the cache again.")
        self.starts = np.cumsum([0] + [s.rows for s in self.shards])
        num_pools = max(len(buckets or []), 1 + max(s.bucket for s in self.shards))
        self._pool_shards = [[k for k, s in enumerate(self.shards) if s.bucket == b] for b in range(num_pools)]
        self._pool_starts = [np.cumsum([0] + [self.shards[k].rows for k in ks]) for ks in self._pool_shards]

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def pool_sizes(self) -> list[int]:
        """Samples per bucket."""
        return [int(starts[-1]) for starts in self._pool_starts]

    def pool_ids(self, pool: int, local: list[int]) -> list[int]:
        """Global sample ids of the ``local``-th samples of a bucket."""
        starts, shards = self._pool_starts[pool], self._pool_shards[pool]
        k = np.searchsorted(starts, local, side="right") - 1
        return [int(self.starts[shards[j]] + i - starts[j]) for j, i in zip(k.tolist(), local)]

    def _locate(self, i: int) -> tuple[Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a cache of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[k], i - int(self.starts[k])

    def latent(self, i: int) -> torch.Tensor:
        shard, row = self._locate(i)
        return shard.latent(row)

    def text(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, row = self._locate(i)
        return shard.text(row)

    def first_captions(self, k: int) -> list[str]:
        """Up to ``k`` distinct captions, in the order the cache holds them (for sample grids)."""
        seen: list[str] = []
        for manifest in self.manifests:
            for line in manifest.read_text().splitlines():
                if line.strip() and (caption := json.loads(line)["caption"]) not in seen:
                    seen.append(caption)
                    if len(seen) == k:
                        return seen
        return seen


def load_cache(directory: str | Path, config: DataConfig, text_identity: str, latent_identity: str,
               latent_shapes: list[tuple[int, ...]] | tuple[int, ...] | None = None,
               buckets: list[Bucket] | None = None) -> LatentCache:
    """A prepared cache. latent_shapes: the latent shape of each bucket (one shape: every shard's)."""
    if latent_shapes is not None and isinstance(latent_shapes[0], int):
        latent_shapes = [tuple(latent_shapes)]
    return LatentCache(directory, config, text_identity, latent_identity, latent_shapes, buckets)
