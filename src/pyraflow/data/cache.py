"""``pyraflow prepare``: latents and text embeddings computed once, stored as safetensors shards.

Layout of a cache directory:
  meta.json                 what made it (dataset, image shape, text encoder, latent space)
  shard-00000.safetensors   latents (n, C, T, h, w), text_tokens (n, L, D), text_lengths (n,), pooled (n, D)
  shard-00000.jsonl         one row per sample: id, latent_shape (full resolution), caption, source
  complete.json             written last: sample and skip counts; its presence means the cache is whole

Every file is written under a temporary name and renamed (pyraflow.storage), so an interrupted ``prepare`` leaves only
whole shards; a rerun skips them, discards the half-written one and carries on. A cache made with a
different text encoder or latent space is refused rather than silently mixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from pyraflow.config import DataConfig
from pyraflow.data.datasets import build_dataset, check_bad_files, iterate_samples
from pyraflow.data.encoded import EncodedData, encode_samples
from pyraflow.storage import atomic_path, remove_partials, write_json, write_text

SHARD_SIZE = 1024
VERSION = 1


def cache_meta(config: DataConfig, text_identity: str, latent_identity: str) -> dict:
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
    }


def check_meta(directory: Path, expected: dict) -> None:
    """Refuse a cache built from other data, another text encoder or another latent space."""
    found = json.loads((directory / "meta.json").read_text())
    differences = [f"{k}: cache has {found.get(k)!r}, config wants {v!r}" for k, v in expected.items() if found.get(k) != v]
    if differences:
        raise ValueError(
            f"the cache in {directory} was made differently ({'; '.join(differences)}). "
            "Prepare a new cache with another --out (or data.cache), or delete this one."
        )


def prepare(config: DataConfig, out: str | Path, text_encoder, latent_space, progress: bool = True) -> dict:
    """Build (or finish) the cache in ``out``; returns {"written": samples, "skipped": bad files, ...}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = cache_meta(config, text_encoder.identity, latent_space.identity)
    if (out / "meta.json").is_file():
        check_meta(out, meta)
    else:
        write_json(out / "meta.json", meta)
    remove_partials(out)  # a shard that was being written when a previous run stopped
    if (out / "complete.json").is_file():
        summary = json.loads((out / "complete.json").read_text())
        return {**summary, "written": 0, "reused": summary["samples"]}

    dataset = build_dataset(config)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, desc=f"prepare {config.dataset}", unit="sample", disable=not progress)
    shard, pending, written, reused, count = 0, [], 0, 0, 0

    def flush(samples):
        nonlocal written, reused
        name = f"shard-{shard:05d}"
        if (out / f"{name}.jsonl").is_file():
            reused += len(samples)
            return
        from safetensors.torch import save_file

        tensors = encode_samples(samples, text_encoder, latent_space)
        with atomic_path(out / f"{name}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        rows = [json.dumps({"id": s.id, "latent_shape": list(tensors["latents"].shape[1:]), "caption": s.caption,
                            "source": s.source, "label": s.label}) for s in samples]
        write_text(out / f"{name}.jsonl", "\n".join(rows) + "\n")  # its presence marks the shard done
        written += len(samples)

    for sample in iterate_samples(dataset):
        pending.append(sample)
        count += 1
        bar.update(1)
        if len(pending) == SHARD_SIZE:
            flush(pending)
            shard, pending = shard + 1, []
    if pending:
        flush(pending)
        shard += 1
    bar.close()
    check_bad_files(dataset, count, config)
    summary = {"samples": count, "shards": shard, "skipped": len(dataset.bad),
               "skipped_files": [{"path": p, "reason": r} for p, r in dataset.bad]}
    write_json(out / "complete.json", summary)
    return {**summary, "written": written, "reused": reused}


def load_cache(directory: str | Path, config: DataConfig, text_identity: str, latent_identity: str,
               latent_shape: tuple[int, ...] | None = None) -> EncodedData:
    """Read a whole cache into memory, checking that it fits the config and that every shard is sound."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "complete.json").is_file():
        raise ValueError(f"{directory} is not a finished cache (no complete.json); run 'pyraflow prepare --out {directory}'.")
    check_meta(directory, cache_meta(config, text_identity, latent_identity))
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "text_tokens": [], "text_lengths": [], "pooled": []}
    rows = []
    for manifest in sorted(directory.glob("shard-*.jsonl")):
        shard_file = manifest.with_suffix(".safetensors")
        try:
            tensors = load_file(str(shard_file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{shard_file} cannot be read ({err}); delete it and rerun 'pyraflow prepare'.") from err
        if latent_shape is not None and tuple(tensors["latents"].shape[1:]) != tuple(latent_shape):
            raise ValueError(
                f"{shard_file} holds latents of shape {tuple(tensors['latents'].shape[1:])} but the config expects "
                f"{tuple(latent_shape)} (channels, frames, height, width); prepare the cache again for this config."
            )
        for key in parts:
            parts[key].append(tensors[key])
        rows += [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    summary = json.loads((directory / "complete.json").read_text())
    return EncodedData(**{k: torch.cat(v) for k, v in parts.items()}, ids=[r["id"] for r in rows],
                       captions=[r["caption"] for r in rows], labels=[r.get("label") for r in rows],
                       skipped=summary["skipped"])
