"""The released Pyramid Flow causal video VAE (a released folder's ``causal_video_vae/``), with its parameter names:

    vae = load_vae(folder)                         # config.json + diffusion_pytorch_model.safetensors
    mean, logvar = vae.encode(video, window=None)  # video (B, 3, 1 + 8k, H, W) in [-1, 1] -> (B, 16, 1 + k, H/8, W/8)
    video = vae.decode(latent, window=None)        # -> (B, 3, 1 + 8(T' - 1), 8h, 8w), not clamped

Causal in time: every 3-D convolution sees only the current and earlier frames (zero frames before the first), so
the first frame is encoded alone (an image is a one-frame video) and each later latent frame stands for 8 frames.
Normalisation and attention work per frame. ``window`` runs the clip in temporal chunks (the first ``window + 1``
frames, then ``window`` at a time): each convolution carries the frames it needs from the previous chunk, so a chunked
pass computes what a whole pass does with a chunk's memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from pyraflow.weights import REFERENCE, read_json, read_tensors, weight_files

LOGVAR_RANGE = (-30.0, 20.0)
NORM_EPS = 1e-6
# The pipelines' latent normalisation, (z - shift) * scale: the first frame (an image) per model, later frames shared.
FIRST_FRAME = {"flux": (-0.04, 1 / 1.8726), "mmdit-sd3": (0.1490, 1 / 1.8415)}
LATER_FRAMES = (-0.2343, 1 / 3.0986)


def normalise(latent: torch.Tensor, arch: str) -> torch.Tensor:
    """VAE latents (B, 16, T', h, w) -> the model's: (z - shift) * scale, frame 0 with ``arch``'s factors, later
    frames with the video ones (a new tensor; the reference's fp32 arithmetic, bit for bit)."""
    return normalise_with(latent, FIRST_FRAME[arch], LATER_FRAMES)


def denormalise(latent: torch.Tensor, arch: str) -> torch.Tensor:
    """The inverse of ``normalise`` as the reference computes it."""
    return denormalise_with(latent, FIRST_FRAME[arch], LATER_FRAMES)


def normalise_with(latent: torch.Tensor, first: tuple[float, float], later: tuple[float, float]) -> torch.Tensor:
    """(z - shift) * scale along dim 2 (frames): frame 0 with ``first`` = (shift, scale), the rest with ``later``."""
    return torch.cat([(latent[:, :, :1] - first[0]) * first[1], (latent[:, :, 1:] - later[0]) * later[1]], dim=2)


def denormalise_with(latent: torch.Tensor, first: tuple[float, float], later: tuple[float, float]) -> torch.Tensor:
    """z / scale + shift, a division by the stored scale (not a product by its reciprocal) as the reference computes
    it, into a new tensor (the reference writes into its argument)."""
    return torch.cat([latent[:, :, :1] / first[1] + first[0], latent[:, :, 1:] / later[1] + later[0]], dim=2)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames in [-1, 1] -> uint8 as the reference converts them: x * 127.5 + 127.5, clamped, truncated."""
    return frames.mul(127.5).add(127.5).clamp(0, 255).byte()


class CausalConv3d(nn.Module):
    """A 3-D convolution padded with zero frames in front (k_t - 1) and zeros around each frame (k // 2). In a
    chunked pass a later chunk is prefixed with the frames this layer kept from the previous one instead."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.kernel, self.temporal_stride = kernel, stride[0]
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, first: bool = True, chunked: bool = False) -> torch.Tensor:
        context = self.kernel - 1
        if context == 0:
            return self.conv(x)
        if first or not chunked:
            x = torch.cat([x.new_zeros(*x.shape[:2], context, *x.shape[3:]), x], dim=2)
        else:  # the frames the windows straddling the chunk boundary need: 2 at stride 1, 1 at stride 2
            x = torch.cat([self.cache[:, :, context - (context // self.temporal_stride):], x], dim=2)
        if chunked:
            self.cache = x[:, :, -context:].detach().clone()
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame on its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        return rearrange(super().forward(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=frames)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, kernel=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, first: bool, chunked: bool) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), first, chunked)
        h = self.conv2(F.silu(self.norm2(h)), first, chunked)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a GroupNorm before it and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        tokens = rearrange(self.group_norm(frames), "n c h w -> n (h w) c")
        out = F.scaled_dot_product_attention(self.to_q(tokens)[:, None], self.to_k(tokens)[:, None],
                                             self.to_v(tokens)[:, None])[:, 0]
        out = rearrange(self.to_out[0](out), "n (h w) c -> n c h w", h=h)
        return rearrange(frames + out, "(b t) c h w -> b c t h w", t=t)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([FrameAttention(channels, groups)])

    def forward(self, x: torch.Tensor, first: bool, chunked: bool) -> torch.Tensor:
        x = self.resnets[0](x, first, chunked)
        return self.resnets[1](self.attentions[0](x), first, chunked)


class Resample(nn.Module):
    """A causal convolution that halves or doubles time or space (doubling by channels to frames / pixels)."""

    def __init__(self, channels: int, kind: str):
        super().__init__()
        self.kind = kind
        out = {"down-space": channels, "down-time": channels, "up-space": 4 * channels, "up-time": 2 * channels}[kind]
        stride = {"down-space": (1, 2, 2), "down-time": (2, 1, 1)}.get(kind, (1, 1, 1))
        self.conv = CausalConv3d(channels, out, stride=stride)

    def forward(self, x: torch.Tensor, first: bool, chunked: bool) -> torch.Tensor:
        x = self.conv(x, first, chunked)
        if self.kind == "up-space":
            return rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=2, q=2)
        if self.kind == "up-time":
            x = rearrange(x, "b (c p) t h w -> b c (t p) h w", p=2)
            return x[:, :, 1:] if first else x  # the first frame of a clip stands alone
        return x


class ResampleBlock(nn.Module):
    """Resnets, then (optionally) a spatial and a temporal resampler: the encoder's down and the decoder's up blocks."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, space: bool, time: bool, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(layers)])
        direction = "up" if up else "down"
        space_name, time_name = ("upsamplers", "temporal_upsamplers") if up else ("downsamplers", "temporal_downsamplers")
        if space:
            setattr(self, space_name, nn.ModuleList([Resample(out_channels, f"{direction}-space")]))
        if time:
            setattr(self, time_name, nn.ModuleList([Resample(out_channels, f"{direction}-time")]))
        self.resamplers = [name for name, on in ((space_name, space), (time_name, time)) if on]

    def forward(self, x: torch.Tensor, first: bool, chunked: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, first, chunked)
        for name in self.resamplers:
            x = getattr(self, name)[0](x, first, chunked)
        return x


class Coder(nn.Module):
    """The encoder (down blocks, then the mid block) or the decoder (the mid block, then up blocks)."""

    def __init__(self, config: dict, part: str):
        super().__init__()
        c = {key.removeprefix(part + "_"): value for key, value in config.items() if key.startswith(part + "_")}
        groups, channels = c["norm_num_groups"], list(c["block_out_channels"])
        up = part == "decoder"
        self.up = up
        order = channels[::-1] if up else channels
        self.conv_in = CausalConv3d(c["in_channels"], order[0])
        blocks = []
        for i, out in enumerate(order):
            space = c["spatial_up_sample" if up else "spatial_down_sample"][i]
            time = c["temporal_up_sample" if up else "temporal_down_sample"][i]
            blocks.append(ResampleBlock(order[max(i - 1, 0)], out, c["layers_per_block"][i], groups, space, time, up))
        self.mid_block = MidBlock(order[-1] if not up else order[0], groups)
        setattr(self, "up_blocks" if up else "down_blocks", nn.ModuleList(blocks))
        self.conv_norm_out = FrameGroupNorm(groups, order[-1], eps=NORM_EPS)
        out_channels = c["out_channels"] * (2 if not up and c.get("double_z", True) else 1)
        self.conv_out = CausalConv3d(order[-1], out_channels)

    def forward(self, x: torch.Tensor, first: bool = True, chunked: bool = False) -> torch.Tensor:
        x = self.conv_in(x, first, chunked)
        if self.up:
            x = self.mid_block(x, first, chunked)
        for block in self.up_blocks if self.up else self.down_blocks:
            x = block(x, first, chunked)
        if not self.up:
            x = self.mid_block(x, first, chunked)
        return self.conv_out(F.silu(self.conv_norm_out(x)), first, chunked)


class CausalVideoVAE(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.latent_channels = config["encoder_out_channels"]
        self.encoder = Coder(config, "encoder")
        self.decoder = Coder(config, "decoder")
        self.quant_conv = CausalConv3d(2 * self.latent_channels, 2 * self.latent_channels, kernel=1)
        self.post_quant_conv = CausalConv3d(self.latent_channels, self.latent_channels, kernel=1)

    @staticmethod
    def _chunks(frames: int, window: int | None) -> list[tuple[int, int]]:
        """[first window + 1 frames, then window at a time, the rest]: the first holds the frame that stands alone."""
        if window is None or frames <= window + 1:
            return [(0, frames)]
        bounds = [0, *range(window + 1, frames, window), frames]
        return list(zip(bounds, bounds[1:]))

    @staticmethod
    def _run(coder, x: torch.Tensor, window: int | None) -> torch.Tensor:
        chunks = CausalVideoVAE._chunks(x.shape[2], window)
        chunked = len(chunks) > 1
        return torch.cat([coder(x[:, :, a:b], first=i == 0, chunked=chunked) for i, (a, b) in enumerate(chunks)], dim=2)

    def _moments(self, video: torch.Tensor, window: int | None) -> torch.Tensor:
        return self.quant_conv(self._run(self.encoder, video, window))

    def _frames(self, latent: torch.Tensor, window: int | None) -> torch.Tensor:
        return self._run(self.decoder, self.post_quant_conv(latent), window)

    @torch.no_grad()
    def moments(self, video: torch.Tensor, window: int | None = None, tile: int | None = None) -> torch.Tensor:
        """The encoder's raw output (B, 32, T', h, w): posterior means, then log-variances before clamping."""
        if tile is not None and max(video.shape[-2:]) > tile:
            return tiled(lambda x: self._moments(x, window), video, tile, 8, downscale=True)
        return self._moments(video, window)

    def encode(self, video: torch.Tensor, window: int | None = None,
               tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior of ``video`` (B, 3, 1 + 8k, H, W) in [-1, 1]; ``window`` (a multiple of 8
        frames) encodes in temporal chunks, ``tile`` (pixels, a multiple of 32) in overlapping spatial tiles."""
        check_frame_count(video.shape[2])
        if window is not None and window % 8:
            raise ValueError(f"encode window={window} must be a multiple of 8 frames.")
        _check_tile(tile)
        mean, logvar = self.moments(video, window, tile).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, window: int | None = None, tile: int | None = None) -> torch.Tensor:
        """Frames (B, 3, 1 + 8(T' - 1), 8h, 8w) of ``latent`` (B, 16, T', h, w), not clamped; ``window`` latent frames
        at a time after the first ``window + 1``; ``tile`` (pixels, a multiple of 32) decodes overlapping tiles of
        tile / 8 latents and blends them."""
        _check_tile(tile)
        if tile is not None and max(latent.shape[-2:]) > tile // 8:
            return tiled(lambda z: self._frames(z, window), latent, tile // 8, 8, downscale=False)
        return self._frames(latent, window)


def check_frame_count(frames: int) -> int:
    """The causal VAE encodes 1 + 8k frames to 1 + k latent frames: that count, or, for another frame count, an error
    naming the nearest valid ones."""
    if frames < 1 or (frames - 1) % 8:
        below = 1 + 8 * max((frames - 1) // 8, 0)
        nearest = f"{below} or {below + 8}" if frames > 1 else "1 or 9"
        raise ValueError(f"the VAE encodes 1 + 8k frames; this clip has {frames}: cut it to {nearest} frames.")
    return 1 + (frames - 1) // 8


def _check_tile(tile: int | None) -> None:
    if tile is not None and (tile < 32 or tile % 32):
        raise ValueError(f"tile={tile} pixels must be a multiple of 32 (the reference's tiles come out the wrong size "
                         "otherwise); e.g. 256 or 512.")


def tiled(run, x: torch.Tensor, size: int, factor: int, downscale: bool, overlap: float = 0.25) -> torch.Tensor:
    """``run`` over overlapping spatial tiles of ``x`` (``size`` per side, ``overlap`` of it shared with the next),
    each tile's output blended linearly into the tiles above and to the left of it over the overlap, then cropped
    and joined. ``factor``: output pixels per input pixel (1 / factor where ``downscale``)."""
    step = int(size * (1 - overlap))
    out_size = size // factor if downscale else size * factor
    blend, keep = int(out_size * overlap), out_size - int(out_size * overlap)
    rows = [[run(x[..., i : i + size, j : j + size]) for j in range(0, x.shape[-1], step)]
            for i in range(0, x.shape[-2], step)]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, dim=-2)
            if j > 0:
                _blend(row[j - 1], tile, blend, dim=-1)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


def _blend(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Fade ``tile``'s first rows (or columns) in over the last ``extent`` of ``before``, in place."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    for y in range(extent):
        mixed = before.select(dim, y - extent) * (1 - y / extent) + tile.select(dim, y) * (y / extent)
        tile.select(dim, y).copy_(mixed)


def load_vae(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> CausalVideoVAE:
    """The causal video VAE of a released folder (``folder`` itself or its ``causal_video_vae/``), weights as stored."""
    folder = Path(folder)
    if (folder / "causal_video_vae").is_dir():
        folder = folder / "causal_video_vae"
    config = read_json(folder / "config.json")
    if config.get("_class_name") != "CausalVideoVAE":
        raise ValueError(f"{folder / 'config.json'} names {config.get('_class_name')!r}, not CausalVideoVAE; point at a "
                         "released folder or its causal_video_vae/.")
    vae = CausalVideoVAE(config)
    state = vae.state_dict()
    stored = dict(read_tensors(weight_files(folder, REFERENCE)))
    missing, unexpected = sorted(set(state) - set(stored)), sorted(set(stored) - set(state))
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"({len(missing)} / {len(unexpected)} in all).")
    vae.load_state_dict(stored)
    return vae.to(device, dtype).eval().requires_grad_(False)
