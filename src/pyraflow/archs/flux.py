"""``model.arch: flux``: the released pyramid-flow-miniflux transformer (the reference's PyramidFluxTransformer),
computing over pyraflow's packed batches with the reference's weights and outputs.

Flux-style double-stream blocks (separate text and visual weights, joint attention per segment), then single-stream
blocks (one set of weights for [text; visual], attention and MLP in parallel), a continuous adaLN and the output
projection. Patches are 2 x 2 with channels last inside a patch, as the reference has them; RoPE on three axes
(t, h, w: 16 / 24 / 24 of a 64 head dim) at integer grid ids of the predicted latent, a history clip of another
grid at ids interpolated linearly across it; text sits at id 0 and, under temporal causality, sees the first frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyraflow.archs.layers import (DoubleStreamBlock, JointAttention, Modulation, ReferenceTransformer,
                                   TimeTextEmbedding, gated, modulated, patch_order, reference_init_kinds)
from pyraflow import compilation
from pyraflow.config import ModelConfig
from pyraflow.archs.base import Context, draw_init_seed, rope_tables
from pyraflow.packing import Layout, PackedBatch

QK_EPS = 1e-6


class FluxSingleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.attn = JointAttention(dim, heads, QK_EPS, (), text_out=False, visual_out=False)

    def _stream(self, x, cond, runs, rope):
        shift, scale, gate = self.norm(cond)
        h = modulated(runs, x, shift, scale)
        return self.attn.visual_qkv(h, rope), h, gate

    def _finish(self, x, out, h, gate, runs):
        mixed = torch.cat([out.flatten(-2), F.gelu(self.proj_mlp(h), approximate="tanh")], dim=-1)
        return gated(runs, x, self.proj_out(mixed), gate)

    def forward(self, c, x, cond_text, cond, ctx: Context, record: list | None = None):
        visual_qkv, h, gate = self._stream(x, cond, ctx.visual, ctx.rope)
        text_qkv, h_text, gate_text = self._stream(c, cond_text, ctx.text, None)  # text at id 0: no rotation
        if record is not None:
            record.append((text_qkv[1], text_qkv[2], visual_qkv[1], visual_qkv[2]))
        out_text, out_visual = compilation.attend(ctx.attention, text_qkv, visual_qkv)
        return self._finish(c, out_text, h_text, gate_text, ctx.text), self._finish(x, out_visual, h, gate, ctx.visual)


def grid_ids(size: int, current: int) -> torch.Tensor:
    """Positions of ``size`` tokens along an axis the predicted latent has ``current`` of: 0..current-1, stretched
    linearly (align_corners=False) where the sizes differ, as the reference places a coarser history clip."""
    ids = torch.arange(current, dtype=torch.float32)
    if size == current:
        return ids
    return F.interpolate(ids[None, None], size, mode="linear").flatten()


def reference_ids(layout: Layout) -> torch.Tensor:
    """(Nv, 3) float (t, h, w) ids of every visual token: t the frame (first_frame on), h and w grid ids relative to
    the segment's predicted latent."""
    pieces = []
    for parts in layout.parts:
        _, _, h_cur, w_cur, _ = parts[-1]
        for _, t, h, w, first in parts:
            ft, fh, fw = torch.meshgrid(torch.arange(t, dtype=torch.float32) + first, grid_ids(h, h_cur),
                                        grid_ids(w, w_cur), indexing="ij")
            pieces.append(torch.stack([ft, fh, fw], dim=-1).reshape(-1, 3))
    return torch.cat(pieces)


class PyramidFlux(ReferenceTransformer):
    arch = "flux"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.init_seed = draw_init_seed()
        self.config = cfg = config
        d, patch_dim = cfg.width, cfg.in_channels * cfg.patch_size**2
        self.time_text_embed = TimeTextEmbedding(d, cfg.pooled_dim)
        self.context_embedder = nn.Linear(cfg.text_dim, d)
        self.x_embedder = nn.Linear(patch_dim, d)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(d, cfg.num_heads, QK_EPS, ("norm_added_q", "norm_added_k"))
                                                 for _ in range(cfg.depth)])
        self.single_transformer_blocks = nn.ModuleList([FluxSingleBlock(d, cfg.num_heads, cfg.mlp_ratio)
                                                        for _ in range(cfg.single_depth)])
        self.norm_out = Modulation(d, 2)
        self.proj_out = nn.Linear(d, patch_dim)
        order = patch_order(cfg.in_channels, cfg.patch_size)
        self.register_buffer("to_reference", order, persistent=False)
        self.register_buffer("from_reference", torch.argsort(order), persistent=False)
        self.init_weights()

    def init_kinds(self) -> dict[str, str]:
        return reference_init_kinds(self, [b.norm.linear for b in self.single_transformer_blocks])

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def rope_for(self, layout: Layout, device: torch.device) -> torch.Tensor:
        return rope_tables(reference_ids(layout).to(device), self.config.axes(), self.config.rope_theta)

    def embed(self, batch: PackedBatch, ctx: Context) -> torch.Tensor:
        return self.x_embedder(ctx.local_visual(batch.visual).index_select(-1, self.to_reference))
