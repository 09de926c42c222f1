"""Packing samples of different stages into one token sequence, and back.

A *segment* is one sample: its text tokens followed by its visual tokens. Segments are concatenated
along one token axis; attention stays inside a segment. The model keeps two streams (text and
visual, with separate weights), so a PackedBatch holds the text tokens of all segments in one tensor
and the visual tokens in another, both in the same segment order.

Segments are reordered so that segments with the same visual shape sit next to each other (a
*group*). Within a group every segment's visual tokens can be viewed as one (G, L, D) tensor, which
lets conditioning broadcast per segment instead of being copied to every token, and lets attention
batch the group without a dense mask. ``PackedBatch.order`` remembers the caller's order.

Visual positions are (t, h, w) in full-resolution token units: a stage-k token covers d = 2**(K-1-k)
fine tokens per side, and sits at their centre, (i + 0.5) * d - 0.5, so a coarse token and the fine
tokens it covers share a place for RoPE.

This module imports no other pyraflow module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange


@dataclass
class Sample:
    """One sample as the model sees it.

    latent: (C, T, H, W) at the sample's stage resolution (an image has T = 1).
    text: (L, D_text) token states; pooled: (D_pooled,).
    timestep: a scalar, or (T,) with one timestep per frame (e.g. a clean-ish history plus a noisy unit).
    """

    stage: int
    latent: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    timestep: torch.Tensor | float


@dataclass(frozen=True)
class Group:
    """Consecutive packed segments with the same visual shape."""

    segments: range  # packed segment indices
    grid: tuple[int, int, int]  # (T, H/p, W/p) tokens per axis
    visual_start: int  # first visual token of the group
    run_start: int  # first conditioning run of the group
    runs_per_segment: int  # 1 (one timestep per segment) or T (one per frame)

    @property
    def visual_length(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass
class Layout:
    """Where every segment's tokens are; computed once per batch, shared by every block."""

    num_stages: int
    patch_size: int
    order: list[int]  # packed segment i holds caller's sample order[i]
    stages: list[int]
    shapes: list[tuple[int, int, int, int]]  # (C, T, H, W) per packed segment
    text_lengths: list[int]
    visual_lengths: list[int]
    text_offsets: list[int]  # len B + 1
    visual_offsets: list[int]  # len B + 1
    groups: list[Group]
    positions: torch.Tensor  # (Nv, 3) float (t, h, w) in full-resolution token units
    frame: torch.Tensor  # (Nv,) long frame index of each visual token
    run_segment: torch.Tensor  # (R,) long segment of each conditioning run
    text_run: torch.Tensor  # (B,) long the run whose conditioning the segment's text stream uses

    @property
    def num_segments(self) -> int:
        return len(self.order)

    @property
    def num_text(self) -> int:
        return self.text_offsets[-1]

    @property
    def num_visual(self) -> int:
        return self.visual_offsets[-1]

    def cu_seqlens(self) -> torch.Tensor:
        """(B + 1,) int32 offsets of the joint [text; visual] segments, as flash-attn varlen expects."""
        lengths = torch.tensor([t + v for t, v in zip(self.text_lengths, self.visual_lengths)])
        return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


@dataclass
class PackedBatch:
    visual: torch.Tensor  # (Nv, C * p * p) patch tokens
    text: torch.Tensor  # (Nt, D_text)
    pooled: torch.Tensor  # (B, D_pooled) per packed segment
    timestep: torch.Tensor  # (R,) one per conditioning run
    layout: Layout

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(
            self.visual.to(device), self.text.to(device), self.pooled.to(device), self.timestep.to(device), self.layout
        )


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., C, T, H, W) -> (..., T * H/p * W/p, C * p * p); tokens in (t, h, w) raster order."""
    return rearrange(latent, "... c t (h p) (w q) -> ... (t h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(tokens: torch.Tensor, shape: tuple[int, int, int, int], patch_size: int) -> torch.Tensor:
    """(T * H/p * W/p, C * p * p) -> (C, T, H, W)."""
    c, t, h, w = shape
    p = patch_size
    return rearrange(tokens, "(t h w) (c p q) -> c t (h p) (w q)", t=t, h=h // p, w=w // p, p=p, q=p, c=c)


def token_positions(grid: tuple[int, int, int], downsample: int) -> torch.Tensor:
    """(T*h*w, 3) positions (t, h, w) of a stage's tokens in full-resolution token units."""
    t, h, w = grid
    ft, fh, fw = torch.meshgrid(
        torch.arange(t, dtype=torch.float32),
        (torch.arange(h, dtype=torch.float32) + 0.5) * downsample - 0.5,
        (torch.arange(w, dtype=torch.float32) + 0.5) * downsample - 0.5,
        indexing="ij",
    )
    return torch.stack([ft, fh, fw], dim=-1).reshape(-1, 3)


def _check(i: int, s: Sample, num_stages: int, patch_size: int, channels: int | None, text_dim: int | None,
           pooled_dim: int | None) -> None:
    where = f"sample {i} (stage {s.stage})"
    if not 0 <= s.stage < num_stages:
        raise ValueError(f"{where}: stage must be in 0..{num_stages - 1}.")
    if s.latent.dim() != 4:
        raise ValueError(
            f"{where}: latent has shape {tuple(s.latent.shape)}; expected (C, T, H, W) (an image has T = 1)."
        )
    c, t, h, w = s.latent.shape
    if channels is not None and c != channels:
        raise ValueError(f"{where}: latent has {c} channels but the model expects {channels}.")
    if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"{where}: latent of {h}x{w} is not a whole number of {patch_size}x{patch_size} patches; "
            f"height and width must be positive multiples of the patch size."
        )
    if s.text.dim() != 2 or s.text.shape[0] < 1:
        raise ValueError(f"{where}: text has shape {tuple(s.text.shape)}; expected (L, D_text) with L >= 1.")
    if text_dim is not None and s.text.shape[1] != text_dim:
        raise ValueError(f"{where}: text width is {s.text.shape[1]} but the model expects {text_dim}.")
    if s.pooled.dim() != 1 or (pooled_dim is not None and s.pooled.shape[0] != pooled_dim):
        raise ValueError(
            f"{where}: pooled text has shape {tuple(s.pooled.shape)}; expected ({pooled_dim or 'D_pooled'},)."
        )
    n = torch.as_tensor(s.timestep).numel()
    if n not in (1, t):
        raise ValueError(f"{where}: {n} timesteps for {t} frames; give one timestep or one per frame.")


def pack(
    samples: list[Sample],
    num_stages: int,
    patch_size: int = 2,
    channels: int | None = None,
    text_dim: int | None = None,
    pooled_dim: int | None = None,
) -> PackedBatch:
    """Concatenate samples of any stages into one PackedBatch (see the module docstring)."""
    if not samples:
        raise ValueError("cannot pack an empty batch: give at least one sample.")
    for i, s in enumerate(samples):
        _check(i, s, num_stages, patch_size, channels, text_dim, pooled_dim)

    def key(i: int):
        s = samples[i]
        runs = torch.as_tensor(s.timestep).numel()
        return (tuple(s.latent.shape[1:]), runs, s.text.shape[0])

    order = sorted(range(len(samples)), key=key)
    visual, text, pooled, timestep, positions, frames = [], [], [], [], [], []
    shapes, stages, text_lengths, visual_lengths, run_segment, text_run = [], [], [], [], [], []
    groups: list[Group] = []
    visual_offset = run_offset = 0
    for b, i in enumerate(order):
        s = samples[i]
        c, t, h, w = s.latent.shape
        grid = (t, h // patch_size, w // patch_size)
        steps = torch.as_tensor(s.timestep, dtype=torch.float32).reshape(-1)
        runs = steps.numel()
        if not groups or groups[-1].grid != grid or groups[-1].runs_per_segment != runs:
            groups.append(Group(range(b, b + 1), grid, visual_offset, run_offset, runs))
        else:
            g = groups[-1]
            groups[-1] = Group(range(g.segments.start, b + 1), g.grid, g.visual_start, g.run_start, runs)
        tokens = patchify(s.latent, patch_size)
        visual.append(tokens)
        text.append(s.text)
        pooled.append(s.pooled)
        timestep.append(steps)
        positions.append(token_positions(grid, 2 ** (num_stages - 1 - s.stage)))
        frames.append(torch.arange(t).repeat_interleave(grid[1] * grid[2]))
        shapes.append((c, t, h, w))
        stages.append(s.stage)
        text_lengths.append(s.text.shape[0])
        visual_lengths.append(tokens.shape[0])
        run_segment.extend([b] * runs)
        text_run.append(run_offset + runs - 1)  # text follows the newest frame's timestep
        visual_offset += tokens.shape[0]
        run_offset += runs

    def offsets(lengths: list[int]) -> list[int]:
        out = [0]
        for n in lengths:
            out.append(out[-1] + n)
        return out

    layout = Layout(
        num_stages=num_stages,
        patch_size=patch_size,
        order=order,
        stages=stages,
        shapes=shapes,
        text_lengths=text_lengths,
        visual_lengths=visual_lengths,
        text_offsets=offsets(text_lengths),
        visual_offsets=offsets(visual_lengths),
        groups=groups,
        positions=torch.cat(positions),
        frame=torch.cat(frames),
        run_segment=torch.tensor(run_segment, dtype=torch.long),
        text_run=torch.tensor(text_run, dtype=torch.long),
    )
    return PackedBatch(
        visual=torch.cat(visual),
        text=torch.cat(text),
        pooled=torch.stack(pooled),
        timestep=torch.cat(timestep),
        layout=layout,
    )


def unpack(tokens: torch.Tensor, layout: Layout, channels: int | None = None) -> list[torch.Tensor]:
    """Model output (Nv, C' * p * p) -> list of (C', T, H, W) in the caller's original sample order."""
    out: list[torch.Tensor | None] = [None] * layout.num_segments
    for b, i in enumerate(layout.order):
        c, t, h, w = layout.shapes[b]
        c = channels or c
        piece = tokens[layout.visual_offsets[b] : layout.visual_offsets[b + 1]]
        out[i] = unpatchify(piece, (c, t, h, w), layout.patch_size)
    return out  # type: ignore[return-value]
