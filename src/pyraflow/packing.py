"""Packing samples of different stages into one token sequence, and back.

A *segment* is one sample: its text tokens followed by its visual tokens. Segments are concatenated
along one token axis; attention stays inside a segment. The model keeps two streams (text and
visual, with separate weights), so a PackedBatch holds the text tokens of all segments in one tensor
and the visual tokens in another, both in the same segment order.

A video segment may also carry *history* (earlier units at lower resolutions, see pyraflow.video): its
visual tokens are then the history parts, oldest first, followed by the predicted latent, each part with
its own conditioning run (timestep) and causal index. Only the predicted tokens are returned by
``unpack`` and enter the loss.

Segments are reordered so that segments with the same visual layout sit next to each other (a
*group*). Within a group every segment's visual tokens can be viewed as one (G, L, D) tensor, which
lets conditioning broadcast per segment instead of being copied to every token, and lets attention
batch the group without a dense mask. ``PackedBatch.order`` remembers the caller's order.
``keep_order=True`` keeps the caller's order instead (groups are then runs of consecutive equal
segments), for layouts that fix the order themselves, e.g. the reference's rows in ``pyraflow.bench``.

A sample may carry its velocity target; the PackedBatch then holds the targets of the predicted tokens in
packed order, with the packed segment of each predicted token, so a loss needs nothing else.

Visual positions are (t, h, w) in full-resolution token units: a stage-k token covers d = 2**(K-1-k)
fine tokens per side, and sits at their centre, (i + 0.5) * d - 0.5, so a coarse token and the fine
tokens it covers share a place for RoPE.

This module imports no other pyraflow module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange


@dataclass
class HistoryPart:
    """Earlier video frames a segment is conditioned on, at some stage's resolution (see pyraflow.video).

    latent: (C, T, h, w) at ``stage``'s resolution; timestep: its noise level on the model's axis;
    first_frame: absolute index of its first frame (the RoPE t coordinate); unit: its causal index (None: each frame
    is its own causal step, first_frame + frame, as the reference's clips are).
    """

    stage: int
    latent: torch.Tensor
    timestep: float
    first_frame: int
    unit: int | None


@dataclass
class Sample:
    """One sample as the model sees it.

    latent: (C, T, H, W) at the sample's stage resolution (an image has T = 1): the frames predicted.
    text: (L, D_text) token states; pooled: (D_pooled,).
    timestep: a scalar, or (T,) with one timestep per frame.
    history: earlier frames placed before ``latent`` in the segment, oldest first (video units).
    first_frame: absolute index of the latent's first frame.
    unit: causal index of the latent. None: each frame is its own causal step (frame index); set, all
    frames of the latent share it and every history part must have a smaller unit.
    target: (C', T, H, W) velocity target of the predicted frames (training), or None.
    """

    stage: int
    latent: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    timestep: torch.Tensor | float
    history: list[HistoryPart] = field(default_factory=list)
    first_frame: int = 0
    unit: int | None = None
    target: torch.Tensor | None = None


@dataclass(frozen=True)
class Group:
    """Consecutive packed segments with the same visual layout (parts, shapes and runs)."""

    segments: range  # packed segment indices
    signature: tuple  # what makes segments alike: per part (stage, grid, runs, causal steps per frame)
    visual_length: int  # visual tokens per segment
    visual_start: int  # first visual token of the group


@dataclass
class Layout:
    """Where every segment's tokens are; computed once per batch, shared by every block."""

    num_stages: int
    patch_size: int
    order: list[int]  # packed segment i holds caller's sample order[i]
    stages: list[int]
    shapes: list[tuple[int, int, int, int]]  # (C, T, H, W) of the predicted latent per packed segment
    text_lengths: list[int]
    visual_lengths: list[int]  # history + predicted tokens per segment
    history_lengths: list[int]  # visual tokens of history, placed first in each segment
    text_offsets: list[int]  # len B + 1
    visual_offsets: list[int]  # len B + 1
    groups: list[Group]
    positions: torch.Tensor  # (Nv, 3) float (t, h, w) in full-resolution token units
    causal_index: torch.Tensor  # (Nv,) long causal step of each visual token: its frame, or its unit for video units
    run_lengths: list[int]  # visual tokens of each conditioning run, in stream order
    parts: list[list[tuple[int, int, int, int, int]]]  # per segment, per part (history first): stage, t, h, w, first frame
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

    @property
    def predicted_lengths(self) -> list[int]:
        """Predicted (non-history) visual tokens per packed segment."""
        return [v - h for v, h in zip(self.visual_lengths, self.history_lengths)]

    def predicted_index(self) -> torch.Tensor:
        """Visual-stream indices of the predicted (non-history) tokens, segment by segment."""
        return torch.cat([torch.arange(self.visual_offsets[b] + self.history_lengths[b], self.visual_offsets[b + 1])
                          for b in range(self.num_segments)])

    def predicted_segment(self) -> torch.Tensor:
        """(N_predicted,) long: the packed segment of each predicted token."""
        return torch.repeat_interleave(torch.arange(self.num_segments), torch.tensor(self.predicted_lengths))

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
    predicted: torch.Tensor  # (N_predicted,) long visual-stream index of every predicted (non-history) token
    predicted_segment: torch.Tensor  # (N_predicted,) long packed segment of each predicted token
    target: torch.Tensor | None = None  # (N_predicted, C' * p * p) velocity targets, when the samples carry them

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """The tensors on ``device`` (the layout's host-side metadata stays where it is)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return PackedBatch(move(self.visual), move(self.text), move(self.pooled), move(self.timestep), self.layout,
                           move(self.predicted), move(self.predicted_segment), move(self.target))

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies, so a DataLoader hands batches to CUDA without a synchronous copy."""
        def pin(t):
            return None if t is None else t.pin_memory()

        return PackedBatch(pin(self.visual), pin(self.text), pin(self.pooled), pin(self.timestep), self.layout,
                           pin(self.predicted), pin(self.predicted_segment), pin(self.target))


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., C, T, H, W) -> (..., T * H/p * W/p, C * p * p); tokens in (t, h, w) raster order."""
    return rearrange(latent, "... c t (h p) (w q) -> ... (t h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(tokens: torch.Tensor, shape: tuple[int, int, int, int], patch_size: int) -> torch.Tensor:
    """(T * H/p * W/p, C * p * p) -> (C, T, H, W)."""
    c, t, h, w = shape
    p = patch_size
    return rearrange(tokens, "(t h w) (c p q) -> c t (h p) (w q)", t=t, h=h // p, w=w // p, p=p, q=p, c=c)


def causal_steps(unit: int | None, first_frame: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(T*h*w,) causal step of every token of a part: its unit, or its frame counted from first_frame."""
    t, h, w = grid
    if unit is not None:
        return torch.full((t * h * w,), unit)
    return (torch.arange(t) + first_frame).repeat_interleave(h * w)


def token_positions(grid: tuple[int, int, int], downsample: int, first_frame: int = 0) -> torch.Tensor:
    """(T*h*w, 3) positions (t, h, w) of a stage's tokens in full-resolution token units."""
    t, h, w = grid
    ft, fh, fw = torch.meshgrid(
        torch.arange(t, dtype=torch.float32) + first_frame,
        (torch.arange(h, dtype=torch.float32) + 0.5) * downsample - 0.5,
        (torch.arange(w, dtype=torch.float32) + 0.5) * downsample - 0.5,
        indexing="ij",
    )
    return torch.stack([ft, fh, fw], dim=-1).reshape(-1, 3)


def _check_latent(where: str, latent: torch.Tensor, stage: int, num_stages: int, patch_size: int,
                  channels: int | None) -> None:
    if not 0 <= stage < num_stages:
        raise ValueError(f"{where}: stage must be in 0..{num_stages - 1}.")
    if latent.dim() != 4:
        raise ValueError(f"{where}: latent has shape {tuple(latent.shape)}; expected (C, T, H, W) (an image has T = 1).")
    c, t, h, w = latent.shape
    if channels is not None and c != channels:
        raise ValueError(f"{where}: latent has {c} channels but the model expects {channels}.")
    if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"{where}: latent of {h}x{w} is not a whole number of {patch_size}x{patch_size} patches; "
            f"height and width must be positive multiples of the patch size."
        )


def _check(i: int, s: Sample, num_stages: int, patch_size: int, channels: int | None, text_dim: int | None,
           pooled_dim: int | None) -> None:
    where = f"sample {i} (stage {s.stage})"
    _check_latent(where, s.latent, s.stage, num_stages, patch_size, channels)
    c, t, h, w = s.latent.shape
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
    if s.target is not None and (s.target.dim() != 4 or s.target.shape[1:] != s.latent.shape[1:]):
        raise ValueError(f"{where}: target has shape {tuple(s.target.shape)}; expected (C', {t}, {h}, {w}) like the latent.")
    # causal steps (first, last) of every part in segment order must increase: history strictly before the latent
    def steps(unit, first_frame, frames):
        return (unit, unit) if unit is not None else (first_frame, first_frame + frames - 1)

    spans = [steps(p.unit, p.first_frame, p.latent.shape[1]) for p in s.history] + [steps(s.unit, s.first_frame, t)]
    if any(a[1] >= b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"{where}: the causal steps of the history {spans[:-1]} must increase and stay below those of the "
                         f"sample {spans[-1]} (give each part a higher unit, or first_frame, than the one before).")
    for j, part in enumerate(s.history):
        _check_latent(f"{where}, history part {j}", part.latent, part.stage, num_stages, patch_size, c)


def pack(
    samples: list[Sample],
    num_stages: int,
    patch_size: int = 2,
    channels: int | None = None,
    text_dim: int | None = None,
    pooled_dim: int | None = None,
    keep_order: bool = False,
) -> PackedBatch:
    """Concatenate samples of any stages into one PackedBatch (see the module docstring)."""
    if not samples:
        raise ValueError("cannot pack an empty batch: give at least one sample.")
    for i, s in enumerate(samples):
        _check(i, s, num_stages, patch_size, channels, text_dim, pooled_dim)
    with_target = [s.target is not None for s in samples]
    if any(with_target) and not all(with_target):
        raise ValueError("some samples carry a target and others do not; give every sample a target, or none.")

    def signature(s: Sample) -> tuple:
        # Segments of one group share their attention mask, so the causal structure is part of the signature: a part
        # is one causal step (its unit), or one step per frame (unit None) counted from its first frame.
        def causal(unit, first_frame):
            return ("unit",) if unit is not None else ("frames", first_frame)

        parts = [(p.stage, tuple(p.latent.shape[1:]), 1, causal(p.unit, p.first_frame)) for p in s.history]
        return tuple(parts + [(s.stage, tuple(s.latent.shape[1:]), torch.as_tensor(s.timestep).numel(),
                               causal(s.unit, s.first_frame))])

    signatures = [signature(s) for s in samples]
    order = list(range(len(samples)))
    if not keep_order:
        order.sort(key=lambda i: (signatures[i], samples[i].text.shape[0]))
    visual, text, pooled, timestep, positions, causal, targets = [], [], [], [], [], [], []
    shapes, stages, text_lengths, visual_lengths, history_lengths = [], [], [], [], []
    run_lengths, run_segment, text_run, parts = [], [], [], []
    groups: list[Group] = []
    visual_offset = run_offset = 0
    for b, i in enumerate(order):
        s = samples[i]
        c, t, h, w = s.latent.shape
        steps = torch.as_tensor(s.timestep, dtype=torch.float32).reshape(-1)
        start = visual_offset
        segment_parts = []
        for part in s.history:  # oldest first, one conditioning run each
            tokens = patchify(part.latent, patch_size)
            grid = (part.latent.shape[1], part.latent.shape[2] // patch_size, part.latent.shape[3] // patch_size)
            visual.append(tokens)
            timestep.append(torch.tensor([float(part.timestep)]))
            positions.append(token_positions(grid, 2 ** (num_stages - 1 - part.stage), part.first_frame))
            causal.append(causal_steps(part.unit, part.first_frame, grid))
            segment_parts.append((part.stage, *grid, part.first_frame))
            run_lengths.append(tokens.shape[0])
            visual_offset += tokens.shape[0]
        history_lengths.append(visual_offset - start)
        grid = (t, h // patch_size, w // patch_size)
        tokens = patchify(s.latent, patch_size)
        visual.append(tokens)
        timestep.append(steps)
        positions.append(token_positions(grid, 2 ** (num_stages - 1 - s.stage), s.first_frame))
        causal.append(causal_steps(s.unit, s.first_frame, grid))
        segment_parts.append((s.stage, *grid, s.first_frame))
        parts.append(segment_parts)
        run_lengths += [tokens.shape[0] // steps.numel()] * steps.numel()
        visual_offset += tokens.shape[0]
        runs = len(s.history) + steps.numel()
        run_segment.extend([b] * runs)
        # Text follows the segment's first run: for video that is the oldest history, which stays fixed while a
        # unit is denoised, so text and history keys/values can be cached (see PackedTransformer.prefix_cache).
        text_run.append(run_offset)
        run_offset += runs
        sig = signatures[i]
        length = visual_offset - start
        if groups and groups[-1].signature == sig:
            g = groups[-1]
            groups[-1] = Group(range(g.segments.start, b + 1), sig, length, g.visual_start)
        else:
            groups.append(Group(range(b, b + 1), sig, length, start))
        if s.target is not None:
            targets.append(patchify(s.target, patch_size))
        text.append(s.text)
        pooled.append(s.pooled)
        shapes.append((c, t, h, w))
        stages.append(s.stage)
        text_lengths.append(s.text.shape[0])
        visual_lengths.append(length)

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
        history_lengths=history_lengths,
        text_offsets=offsets(text_lengths),
        visual_offsets=offsets(visual_lengths),
        groups=groups,
        positions=torch.cat(positions),
        causal_index=torch.cat(causal),
        run_lengths=run_lengths,
        parts=parts,
        run_segment=torch.tensor(run_segment, dtype=torch.long),
        text_run=torch.tensor(text_run, dtype=torch.long),
    )
    return PackedBatch(
        visual=torch.cat(visual),
        text=torch.cat(text),
        pooled=torch.stack(pooled),
        timestep=torch.cat(timestep),
        layout=layout,
        predicted=layout.predicted_index(),
        predicted_segment=layout.predicted_segment(),
        target=torch.cat(targets) if targets else None,
    )


def unpack(tokens: torch.Tensor, layout: Layout, channels: int | None = None) -> list[torch.Tensor]:
    """Model output -> list of (C', T, H, W) predicted latents (history dropped), in the caller's sample order.

    tokens: (Nv, C' * p * p) over every visual token, or (N_predicted, ...) over the predicted ones only.
    """
    full = tokens.shape[0] == layout.num_visual
    out: list[torch.Tensor | None] = [None] * layout.num_segments
    start = 0
    for b, i in enumerate(layout.order):
        c, t, h, w = layout.shapes[b]
        c = channels or c
        n = layout.visual_lengths[b] - layout.history_lengths[b]
        first = layout.visual_offsets[b] + layout.history_lengths[b] if full else start
        out[i] = unpatchify(tokens[first : first + n], (c, t, h, w), layout.patch_size)
        start += n
    return out  # type: ignore[return-value]


def unpack_stacked(tokens: torch.Tensor, layout: Layout, channels: int | None = None) -> torch.Tensor:
    """Like ``unpack`` for predicted latents that all have one shape, as one (B, C', T, H, W) tensor in the caller's
    order, computed on the tokens' device without a loop over samples.

    tokens: (N_predicted, C' * p * p) over the predicted tokens, in packed order.
    """
    shapes = set(layout.shapes)
    if len(shapes) != 1:
        raise ValueError(f"unpack_stacked needs predicted latents of one shape; this batch has {sorted(shapes)}.")
    c, t, h, w = shapes.pop()
    p = layout.patch_size
    per_segment = tokens.view(layout.num_segments, -1, tokens.shape[-1])  # packed order
    caller = torch.empty(layout.num_segments, dtype=torch.long)
    caller[torch.tensor(layout.order)] = torch.arange(layout.num_segments)
    ordered = per_segment.index_select(0, caller.to(tokens.device))
    return rearrange(ordered, "b (t h w) (c p q) -> b c t (h p) (w q)", t=t, h=h // p, w=w // p, p=p, q=p,
                     c=channels or c)
