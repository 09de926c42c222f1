"""Latent spaces: pixels (identity with scale and shift), a diffusers AutoencoderKL from a local path, or Pyramid
Flow's causal video VAE.

Images and videos are (B, C, T, H, W) in [-1, 1]; videos go through a 2D VAE frame by frame.
Latents are normalised as (z - shift) * scale so they have roughly unit variance, like SD3/Flux.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from pyraflow.config import LatentConfig


class PixelSpace:
    can_decode = True

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

    can_decode = True

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


class PreparedLatents:
    """The latent space of a run trained from latents prepared elsewhere (latent.kind=vae with no latent.path): its
    shape and normalisation are known from the config, but without the VAE nothing can be encoded or decoded."""

    can_decode = False

    def __init__(self, config: LatentConfig):
        self.scale = 1.0 if config.scale is None else config.scale
        self.shift = 0.0 if config.shift is None else config.shift
        self.video_scale = self.scale if config.video_scale is None else config.video_scale
        self.video_shift = self.shift if config.video_shift is None else config.video_shift
        self.identity = f"vae:prepared:{config.channels}x{config.downsample}:{self.scale}:{self.shift}"

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (C, T, H, W) -> the model's latents: (z - shift) * scale, a clip's later frames with the
        video factors (as the reference normalises the output of its causal VAE)."""
        from pyraflow.interop.vae import normalise_with

        return normalise_with(raw[None].float(), *self.factors())[0]

    def factors(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((shift, scale) of a clip's first frame, (shift, scale) of its later frames)."""
        return (self.shift, self.scale), (self.video_shift, self.video_scale)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError("latent.path is not set, so images cannot be encoded; point latent.path at the AutoencoderKL.")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise ValueError("latent.path is not set, so samples cannot be decoded to pixels; point latent.path at the "
                         "AutoencoderKL the latents were made with.")


class ReleasedVAESpace(PreparedLatents):
    """latent.kind=pyramid-flow-vae: Pyramid Flow's causal video VAE (a released folder's causal_video_vae/), which
    turns 1 + 8k frames into 1 + k latent frames; latents are the posterior means, normalised as the reference does
    (the first frame and the later ones apart). Decoding runs two latent frames at a time, as the reference's
    pipeline does."""

    can_decode = True
    DECODE_WINDOW = 2  # the reference's decode_latent without save_memory (1 with it)
    TILE = 512  # pixels: larger frames are decoded in blended tiles (its tile_sample_min_size; 256 with save_memory)

    def __init__(self, config: LatentConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from pyraflow.interop.vae import load_vae

        super().__init__(config)
        self.vae = load_vae(config.path, device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.decode_window, self.tile = self.DECODE_WINDOW, self.TILE
        self.identity = f"pyramid-flow-vae:{Path(config.path).resolve()}:{self.factors()}"

    def to(self, device: torch.device | str) -> "ReleasedVAESpace":
        self.device = torch.device(device)
        self.vae.to(self.device)
        return self

    @torch.no_grad()
    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, 1 + 8k, H, W) in [-1, 1] -> the posterior means as the VAE gives them (what the reference's
        extraction stores), fp32 on the CPU."""
        mean, _ = self.vae.encode(pixels.to(self.device, self.dtype), tile=self.tile)
        return mean.float().cpu()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        from pyraflow.interop.vae import normalise_with

        return normalise_with(self.encode_raw(pixels), *self.factors())

    @staticmethod
    def pixel_frames(latent_frames: int) -> int:
        """Video frames that encode to ``latent_frames``: the first frame alone, then 8 per latent frame."""
        return 1 + 8 * (latent_frames - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> frames, ``decode_window`` latent frames at a time, in tiles of ``tile`` pixels (None: whole)."""
        from pyraflow.interop.vae import denormalise_with

        raw = denormalise_with(latents.to(self.device).float(), *self.factors())
        return self.vae.decode(raw.to(self.dtype), window=self.decode_window, tile=self.tile).float().cpu()


def build_latent_space(config: LatentConfig, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> PixelSpace | VAESpace | PreparedLatents:
    """The latent space of ``config``; ``dtype``: the released causal VAE's weights (bf16 halves them)."""
    if config.kind == "pixel":
        return PixelSpace(config)
    if config.kind == "pyramid-flow-vae":
        return ReleasedVAESpace(config, device, dtype)
    return VAESpace(config, device) if config.path is not None else PreparedLatents(config)
