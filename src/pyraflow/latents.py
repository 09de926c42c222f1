"""Latent spaces: pixels (identity with scale and shift) or a diffusers AutoencoderKL from a local path.

Images and videos are (B, C, T, H, W) in [-1, 1]; videos go through a 2D VAE frame by frame.
Latents are normalised as (z - shift) * scale so they have roughly unit variance, like SD3/Flux.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange


@dataclass
class LatentConfig:
    kind: str = "pixel"
    """``pixel`` (train on pixels) or ``vae`` (a diffusers AutoencoderKL in ``path``)."""
    path: str | None = None
    """Local directory of the AutoencoderKL (config.json + weights) for kind=vae."""
    scale: float | None = None
    """Latent scale; None: 1 for pixels, the VAE config's scaling_factor for vae."""
    shift: float | None = None
    """Latent shift; None: 0 for pixels, the VAE config's shift_factor (or 0) for vae."""
    channels: int | None = None
    """Latent channels; None: the image channels for pixels, read from the VAE config for vae."""
    downsample: int | None = None
    """Pixels per latent per side; None: 1 for pixels, read from the VAE config for vae."""

    def __post_init__(self) -> None:
        if self.kind not in ("pixel", "vae"):
            raise ValueError(f"latent.kind={self.kind!r} must be 'pixel' or 'vae'.")
        if self.kind == "vae" and self.path is None and (self.channels is None or self.downsample is None):
            raise ValueError(
                "latent.kind=vae needs latent.path (a local AutoencoderKL directory), or latent.channels and "
                "latent.downsample for planning without the weights."
            )
        if self.kind == "pixel" and self.downsample not in (None, 1):
            raise ValueError(f"latent.downsample={self.downsample} must be 1 (or unset) in pixel space.")

    def vae_config(self) -> dict:
        import json

        path = Path(self.path) / "config.json"
        if not path.is_file():
            raise ValueError(f"latent.path={self.path!r} has no config.json; point it at a diffusers AutoencoderKL directory.")
        return json.loads(path.read_text())

    def resolved_channels(self, image_channels: int) -> int:
        if self.channels is not None:
            return self.channels
        if self.kind == "pixel":
            return image_channels
        return int(self.vae_config()["latent_channels"])

    def resolved_downsample(self) -> int:
        if self.downsample is not None:
            return self.downsample
        if self.kind == "pixel":
            return 1
        return 2 ** (len(self.vae_config()["block_out_channels"]) - 1)


class PixelSpace:
    def __init__(self, config: LatentConfig):
        self.scale = 1.0 if config.scale is None else config.scale
        self.shift = 0.0 if config.shift is None else config.shift
        self.identity = f"pixel:{self.scale}:{self.shift}"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift


class VAESpace:
    """A frozen diffusers AutoencoderKL; the mean of the posterior is used as the latent."""

    def __init__(self, config: LatentConfig, device: torch.device | str = "cpu"):
        from diffusers import AutoencoderKL

        hf = config.vae_config()
        self.vae = AutoencoderKL.from_pretrained(config.path).eval().to(device)
        self.vae.requires_grad_(False)
        self.scale = config.scale if config.scale is not None else float(hf.get("scaling_factor", 1.0))
        self.shift = config.shift if config.shift is not None else float(hf.get("shift_factor") or 0.0)
        self.device = torch.device(device)
        self.identity = f"vae:{Path(config.path).resolve()}:{self.scale}:{self.shift}"

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        t = pixels.shape[2]
        frames = rearrange(pixels, "b c t h w -> (b t) c h w").to(self.device)
        z = self.vae.encode(frames).latent_dist.mean
        return rearrange((z - self.shift) * self.scale, "(b t) c h w -> b c t h w", t=t).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        t = latents.shape[2]
        z = rearrange(latents, "b c t h w -> (b t) c h w").to(self.device) / self.scale + self.shift
        return rearrange(self.vae.decode(z).sample, "(b t) c h w -> b c t h w", t=t).cpu()


def build_latent_space(config: LatentConfig, device: torch.device | str = "cpu") -> PixelSpace | VAESpace:
    return PixelSpace(config) if config.kind == "pixel" else VAESpace(config, device)
