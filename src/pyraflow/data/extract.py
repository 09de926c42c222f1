"""``pyraflow prepare --layout pyramid-flow``: the reference's annotation layout (pyraflow.data.pyramid_flow reads it)
written from raw clips or images with a released folder's causal video VAE and text encoders, as the reference's
tools/extract_video_vae_latents.py and tools/extract_text_features.py do, so a fine-tune needs nothing from the
reference."""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from pyraflow.config import Config

ANNOTATIONS = "annotation.jsonl"


def row_stem(sample_id: str) -> str:
    """A file name for a sample (``clip.mp4#2``): readable, and unique by a checksum of the whole id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("_")[-80:]
    return f"{safe}-{zlib.crc32(sample_id.encode()):08x}"


def _save(tensor_or_dict, path: Path) -> None:
    from pyraflow.storage import atomic_path

    with atomic_path(path) as tmp:
        torch.save(tensor_or_dict, tmp)


def extract(config: Config, out: str | Path, device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Clips (or images) of ``config.data`` -> ``out``/annotation.jsonl in the reference's layout, with
    ``latents/<stem>-latent.pt`` (the VAE posterior's mean [1, 16, T, H/8, W/8], not normalised: training reads
    normalise it) and ``text_feature/<stem>-text.pt`` (the encoders' prompt_embed, prompt_attention_mask and
    pooled_prompt_embed of the caption, as the reference's tools save them). ``data.frames`` counts latent frames: a
    clip is cut to 1 + 8 (frames - 1) video frames; a video row names its decoded frame indices (the reference's
    ``frames`` key). Resumable: files already written are kept (each is written whole), the jsonl is written
    as it goes and published at the end. A clip that cannot be decoded is skipped, named and counted."""
    from tqdm import tqdm

    from pyraflow.data.datasets import VideoClips, check_bad_files, iterate_samples
    from pyraflow.data.sources import build_dataset, resolve_buckets
    from pyraflow.latents import ReleasedVAESpace, build_latent_space
    from pyraflow.storage import atomic_path, remove_partials
    from pyraflow.text import ReleasedText, load_text_encoder

    if config.latent.kind != "pyramid-flow-vae" or config.text.encoder != "pyramid-flow":
        raise ValueError("the reference's layout holds the released VAE's latents and text features: set "
                         "latent.kind=pyramid-flow-vae (latent.path: <folder>/causal_video_vae) and "
                         "text.encoder=pyramid-flow (text.path: the released folder).")
    if config.data.dataset == "pyramid-flow":
        raise ValueError("data.dataset=pyramid-flow is already extracted; point data at the raw clips "
                         "(data.dataset=video-folder or image-folder).")
    latent_space: ReleasedVAESpace = build_latent_space(config.latent, device)
    text: ReleasedText = load_text_encoder(config.text, device)
    pixel_frames = latent_space.pixel_frames
    data = replace(config.data, frames=pixel_frames(config.data.frames), frame_buckets=None if
                   config.data.frame_buckets is None else [pixel_frames(f) for f in config.data.frame_buckets])
    buckets = [replace(b, frames=pixel_frames(b.frames)) for b in resolve_buckets(config)] if data.bucketed else None
    dataset = build_dataset(data, buckets=buckets)
    out = Path(out)
    for folder in (out / "latents", out / "text_feature", out):  # and what an interrupted run left half-written
        folder.mkdir(parents=True, exist_ok=True)
        remove_partials(folder)
    video = isinstance(dataset, VideoClips)
    annotations = out / ANNOTATIONS
    rows, written, reused = 0, 0, 0
    # rows go to the jsonl as they are made (memory does not grow with the dataset); it is published whole at the end
    with atomic_path(annotations) as tmp, open(tmp, "w", encoding="utf-8") as jsonl:
        for sample in tqdm(iterate_samples(dataset), desc="extract", unit="clip" if video else "image",
                           disable=not progress):
            stem = row_stem(sample.id)
            latent, features = f"latents/{stem}-latent.pt", f"text_feature/{stem}-text.pt"
            if (out / latent).is_file() and (out / features).is_file():
                reused += 1
            else:
                _save(latent_space.encode_raw(sample.pixels[None]), out / latent)
                embeds, mask, pooled = text.encoder.encode([sample.caption])
                _save({"prompt_embed": embeds.cpu(), "prompt_attention_mask": mask.cpu(),
                       "pooled_prompt_embed": pooled.cpu()}, out / features)
                written += 1
            source, _, start = sample.source.partition("#")
            row = {"video" if video else "image": source, "text": sample.caption, "latent": latent,
                   "text_fea": features}
            if video:
                span = sample.pixels.shape[1] * data.frame_stride
                row["frames"] = list(range(int(start), int(start) + span, data.frame_stride))
            jsonl.write(json.dumps(row) + "\n")
            rows += 1
        check_bad_files(dataset, rows, data)
    return {"annotations": str(annotations), "rows": rows, "written": written, "reused": reused,
            "skipped": len(dataset.bad), "skipped_files": [{"path": p, "reason": r} for p, r in dataset.bad]}
