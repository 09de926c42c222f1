"""``model.arch: mmdit-sd3``: the released pyramid-flow-sd3 transformer (the reference's PyramidDiffusionMMDiT as its
pipeline loads it), computing over pyraflow's packed batches with the reference's weights and outputs.

SD3 joint blocks (the last one reads the text but writes none), a 2-D sincos position table added to the patch
embeddings and RoPE over the whole head dim on the frame index only. The table is cropped at its centre to the
predicted latent's patch grid; a history clip of another grid gets that crop resized bilinearly to its own grid.
The patch embedding is the reference's 2 x 2 convolution, applied as a linear map to pyraflow's (c, p, q) patch
vectors; the output projection writes (p, q, c), reordered to pyraflow's patches.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyraflow.archs.layers import (DoubleStreamBlock, Modulation, ReferenceTransformer, TimeTextEmbedding,
                                   patch_order, reference_init_kinds)
from pyraflow.config import ModelConfig
from pyraflow.archs.base import Context, draw_init_seed, rope_tables
from pyraflow.packing import Layout, PackedBatch

QK_EPS = 1e-5


def sincos_table(dim: int, side: int, base_size: int) -> torch.Tensor:
    """(side*side, dim) 2-D sincos table: row i*side + j = [s(x_j), s(x_i)] with x_k = k * base_size / side and
    s(x) = [sin(x w), cos(x w)], w_m = 10000^(-m / (dim/4)): the first half encodes the column."""
    coords = torch.arange(side, dtype=torch.float32) / (side / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(x: torch.Tensor) -> torch.Tensor:
        angles = x.double()[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([encode(cols.reshape(-1)), encode(rows.reshape(-1))], dim=-1).float()


class PatchEmbedding(nn.Module):
    """The reference's ``pos_embed``: the patch convolution and the position table (a buffer kept in checkpoints)."""

    def __init__(self, channels: int, dim: int, patch: int, side: int, base_size: int):
        super().__init__()
        self.side = side
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_table(dim, side, base_size)[None], persistent=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C * p * p) patch vectors in (c, p, q) order -> (N, D), as the stride-p convolution computes them."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def positions(self, layout: Layout) -> torch.Tensor:
        """(Nv, D) position embedding of every visual token: the centre crop at its segment's predicted grid,
        resized to a history clip's grid where that differs, repeated over the frames."""
        table = self.pos_embed[0].view(self.side, self.side, -1)
        crops: dict[tuple[int, int, int, int], torch.Tensor] = {}
        pieces = []
        for parts in layout.parts:
            _, _, h_cur, w_cur, _ = parts[-1]
            if h_cur > self.side or w_cur > self.side:
                raise ValueError(f"a latent of {h_cur}x{w_cur} patches exceeds the position table of the mmdit-sd3 "
                                 f"model ({self.side}x{self.side}, model.pos_embed_max_size); sample smaller sizes.")
            for _, t, h, w, _ in parts:
                key = (h_cur, w_cur, h, w)
                if key not in crops:
                    top, left = (self.side - h_cur) // 2, (self.side - w_cur) // 2
                    crop = table[top : top + h_cur, left : left + w_cur]
                    if (h, w) != (h_cur, w_cur):
                        crop = F.interpolate(crop.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0].permute(1, 2, 0)
                    crops[key] = crop.reshape(h * w, -1)
                pieces.append(crops[key].repeat(t, 1))
        return torch.cat(pieces)


class PyramidSD3(ReferenceTransformer):
    # Built in the same shape as PyramidFlux (embedders, a block list, the output head) but from other modules: each
    # class mirrors its reference class's attribute names, which are its weights' names, so they stay apart.
    arch = "mmdit-sd3"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.init_seed = draw_init_seed()
        self.config = cfg = config
        d, patch_dim = cfg.width, cfg.in_channels * cfg.patch_size**2
        self.pos_embed = PatchEmbedding(cfg.in_channels, d, cfg.patch_size, cfg.pos_embed_max_size,
                                        cfg.sample_size // cfg.patch_size)
        self.time_text_embed = TimeTextEmbedding(d, cfg.pooled_dim)
        self.context_embedder = nn.Linear(cfg.text_dim, d)
        self.transformer_blocks = nn.ModuleList([
            DoubleStreamBlock(d, cfg.num_heads, QK_EPS, ("norm_add_q", "norm_add_k"), text_pre_only=i == cfg.depth - 1)
            for i in range(cfg.depth)
        ])
        self.norm_out = Modulation(d, 2)
        self.proj_out = nn.Linear(d, patch_dim)
        self.register_buffer("from_reference", torch.argsort(patch_order(cfg.in_channels, cfg.patch_size)),
                             persistent=False)
        self.init_weights()

    def init_kinds(self) -> dict[str, str]:
        return reference_init_kinds(self)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer_blocks

    def rope_for(self, layout: Layout, device: torch.device) -> torch.Tensor:
        """Rotations over the whole head dim at each token's frame index (text: 0, the identity)."""
        return rope_tables(layout.positions[:, :1].to(device), [self.config.head_dim], self.config.rope_theta)

    def embed(self, batch: PackedBatch, ctx: Context) -> torch.Tensor:
        x = self.pos_embed(ctx.local_visual(batch.visual))
        return x + ctx.local_visual(self.pos_embed.positions(batch.layout)).to(x.dtype)
