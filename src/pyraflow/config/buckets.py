"""Shape buckets: the picture sizes (and clip lengths) a run trains on, so data keeps its aspect ratio.

A bucket is a (height, width, frames) in pixels. Its sides are multiples of what the pyramid and the patches need
(patch size x 2**(stages - 1) x the latent space's downsampling), and its area is close to the target area
(data.resolution squared). An image or clip goes to the bucket nearest its aspect ratio (in log ratio) and is
resized to cover it, then centre-cropped only by the bucket's rounding.

Aspect ratios are width / height: 0.5 is a portrait twice as tall as wide; "3:4" reads as 3 wide, 4 tall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STANDARD_ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # what ``auto`` chooses from
AUTO_MIN_SHARE = 0.02  # under ``auto`` an aspect ratio becomes a bucket when at least this share of the data has it


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    frames: int = 1

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}" + (f"x{self.frames}" if self.frames > 1 else "")

    def shape(self, channels: int, downsample: int = 1) -> tuple[int, int, int, int]:
        """(C, T, H, W) of this bucket's latents."""
        return (channels, self.frames, self.height // downsample, self.width // downsample)


def parse_aspect(value, where: str = "data.aspect_buckets") -> float:
    """A ratio width / height from a number or a "W:H" string."""
    if isinstance(value, str) and ":" in value:
        w, _, h = value.partition(":")
        try:
            ratio = float(w) / float(h)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{where}: {value!r} is not a ratio like '3:4' (width:height).") from None
    else:
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a ratio (a number width/height, or 'W:H').") from None
    if not 0.1 <= ratio <= 10:
        raise ValueError(f"{where}: aspect ratio {value!r} = {ratio:g} is outside 1:10 .. 10:1.")
    return ratio


def bucket_side(exact: float, multiple: int) -> int:
    return max(multiple, round(exact / multiple) * multiple)


def make_buckets(aspects: list[float], resolution: int, multiple: int, frames: list[int]) -> list[Bucket]:
    """One bucket per (aspect ratio, clip length): sides rounded to ``multiple``, area near resolution squared."""
    area = resolution * resolution
    buckets = set()
    for aspect in aspects:
        height = math.sqrt(area / aspect)
        for f in frames:
            buckets.add(Bucket(bucket_side(height, multiple), bucket_side(height * aspect, multiple), f))
    return sorted(buckets, key=lambda b: (b.aspect, b.frames, b.height))


def nearest_bucket(width: int, height: int, buckets: list[Bucket], frames: int | None = None) -> int:
    """Index of the bucket for a picture of width x height (and a clip of ``frames`` frames, which must reach the
    bucket's length): the closest aspect ratio in log ratio, then the longest clip."""
    aspect = math.log(width / height)
    fitting = [i for i, b in enumerate(buckets) if frames is None or b.frames <= frames]
    if not fitting:
        raise ValueError(f"a clip of {frames} frames is shorter than every bucket ({sorted({b.frames for b in buckets})}).")
    return min(fitting, key=lambda i: (round(abs(aspect - math.log(buckets[i].aspect)), 9), -buckets[i].frames))


def auto_aspects(sizes: list[tuple[int, int]]) -> list[float]:
    """The standard aspect ratios that at least AUTO_MIN_SHARE of the (width, height) sizes are nearest to."""
    if not sizes:
        return [1.0]
    counts = [0] * len(STANDARD_ASPECTS)
    for w, h in sizes:
        counts[min(range(len(STANDARD_ASPECTS)), key=lambda i: abs(math.log(w / h) - math.log(STANDARD_ASPECTS[i])))] += 1
    chosen = [a for a, n in zip(STANDARD_ASPECTS, counts) if n >= AUTO_MIN_SHARE * len(sizes)]
    return chosen or [STANDARD_ASPECTS[counts.index(max(counts))]]
