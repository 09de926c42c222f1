"""Which dataset a config names: the dispatcher over the dataset kinds (pyraflow.data.datasets, .scenes), and what
a run needs to know about its data before reading it (its size, its shape buckets)."""

from __future__ import annotations

from pathlib import Path

from pyraflow.config import Bucket, DataConfig
from pyraflow.data.datasets import (CLIP_CAPTIONS, MNIST_SIZES, VIDEO_EXTENSIONS, ImageFolder, MnistDigits, Shaper,
                                    VideoClips, bundled_clip_files, existing_folder, read_captions)
from pyraflow.data.emoji import EmojiGlyphs
from pyraflow.data.scenes import SceneCrops

HELDOUT_DATASETS = ("mnist", "emoji")  # datasets with a fixed held-out split (what pyraflow eval scores against)


def planned_size(config: DataConfig) -> int:
    """Number of training samples, without reading the data where that can be avoided."""
    if config.num_samples is not None:
        return config.num_samples
    if config.dataset == "mnist":
        return MNIST_SIZES["train"]
    if config.dataset == "pyramid-flow":
        raise ValueError("the size of a pyramid-flow dataset is its usable rows (pyraflow.data.pyramid_flow); set "
                         "data.num_samples to plan without them.")
    dataset = build_dataset(config)
    if isinstance(dataset, VideoClips):  # clips per video are only known once it is decoded
        return sum(1 for _ in dataset.clips())
    return len(dataset)


def build_dataset(config: DataConfig, split: str = "train", buckets: list[Bucket] | None = None):
    """The dataset object for a config: indexable (mnist, image-folder, scenes) or a clip iterator (videos).
    ``buckets``: the run's shapes (Config.buckets / resolve_buckets); None: data.image_size squares. ``split``:
    ``heldout`` for the datasets that keep one (HELDOUT_DATASETS)."""
    shaper = Shaper(config, buckets)
    if split != "train" and config.dataset not in HELDOUT_DATASETS:
        raise ValueError(f"data.dataset={config.dataset} has no {split!r} split; only {', '.join(HELDOUT_DATASETS)} do.")
    if config.dataset == "mnist":
        return MnistDigits(config, split, shaper)
    if config.dataset == "emoji":
        return EmojiGlyphs(config, split, shaper)
    if config.dataset == "image-folder":
        return ImageFolder(config, shaper)
    if config.dataset == "scenes":
        return SceneCrops(config, shaper)
    if config.dataset == "clips":
        return VideoClips(config, bundled_clip_files(), dict(CLIP_CAPTIONS), None, shaper)
    folder = existing_folder(config)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    return VideoClips(config, files, read_captions(folder), folder, shaper)


def resolve_buckets(config) -> list[Bucket]:
    """The run's buckets (a Config); data.aspect_buckets = auto takes the aspect ratios the data has."""
    from pyraflow.config import auto_aspects

    if config.data.dataset == "pyramid-flow" and config.data.path and Path(config.data.path).is_file():
        from pyraflow.data.pyramid_flow import load_annotations  # the shapes the extracted latents have

        return load_annotations(config).buckets(config.latent.resolved_downsample())
    if config.data.aspect_buckets != "auto":
        return config.buckets()
    return config.buckets(auto_aspects(build_dataset(config.data).item_sizes()))


