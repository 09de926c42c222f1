"""pyraflow's own multi-stage MMDiT: one SD3-style transformer over packed segments of any stage.

    v = model(batch)  # batch: PackedBatch; v: (Nv, C * p * p), row i = visual token i

Text and visual tokens have separate weights (two streams) and meet in joint attention inside each segment.
Conditioning c = embed(timestep) + embed(pooled text) drives adaLN-Zero per segment, or per frame where a segment
carries one timestep per frame (a *run*). Modulation vectors are broadcast over each group of equal-shape runs rather
than copied to every token (pyraflow.archs.base.RunBroadcast).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyraflow import compilation
from pyraflow.archs.base import (TIMESTEP_FEATURES, Context, PackedTransformer, PrefixCache, RunBroadcast, apply_rope,
                                 draw_init_seed, gated, modulated, parameter_kinds, rms_norm, rope_tables,
                                 timestep_embedding)
from pyraflow.config import ModelConfig
from pyraflow.packing import Layout, PackedBatch


class Stream(nn.Module):
    """One modality's weights inside a block (SD3 keeps text and visual weights apart)."""

    def __init__(self, cfg: ModelConfig, pre_only: bool = False):
        super().__init__()
        d = cfg.width
        self.pre_only = pre_only
        self.modulation = nn.Linear(d, (2 if pre_only else 6) * d)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        if not pre_only:
            self.proj = nn.Linear(d, d)
            hidden = int(d * cfg.mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def qkv_heads(self, x, cond, runs: RunBroadcast, heads: int):
        mod = self.modulation(cond).chunk(2 if self.pre_only else 6, dim=-1)
        h = modulated(runs, x, mod[0], mod[1])
        q, k, v = self.qkv(h).unflatten(-1, (3, heads, -1)).unbind(-3)  # (N, H, Dh) each
        q, k = rms_norm(q, self.q_norm.weight, self.q_norm.eps), rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        return q, k, v, mod

    def finish(self, x, attn_out, mod, runs: RunBroadcast):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = gated(runs, x, self.proj(attn_out), gate_msa)
        h = modulated(runs, x, shift_mlp, scale_mlp)
        return gated(runs, x, self.mlp(h), gate_mlp)


class MMDiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, last: bool = False):
        super().__init__()
        self.heads = cfg.num_heads
        self.text = Stream(cfg, pre_only=last)  # the last block's text output is never read
        self.visual = Stream(cfg)

    def forward(self, x_text, x_visual, cond_text, cond_visual, ctx: Context, record: list | None = None):
        qt, kt, vt, mod_t = self.text.qkv_heads(x_text, cond_text, ctx.text, self.heads)
        qv, kv, vv, mod_v = self._visual_qkv(x_visual, cond_visual, ctx)
        if record is not None:
            record.append((kt, vt, kv, vv))
        out_text, out_visual = compilation.attend(ctx.attention, (qt, kt, vt), (qv, kv, vv))
        x_visual = self.visual.finish(x_visual, out_visual.flatten(-2), mod_v, ctx.visual)
        if not self.text.pre_only:
            x_text = self.text.finish(x_text, out_text.flatten(-2), mod_t, ctx.text)
        return x_text, x_visual

    def _visual_qkv(self, x_visual, cond_visual, ctx: Context):
        qv, kv, vv, mod_v = self.visual.qkv_heads(x_visual, cond_visual, ctx.visual, self.heads)
        return apply_rope(qv, ctx.rope), apply_rope(kv, ctx.rope), vv, mod_v

    def forward_prefixed(self, x_visual, cond_visual, ctx: Context, cached: tuple[torch.Tensor, ...]):
        """The visual stream of the predicted tokens only, attending to cached text and history keys/values."""
        qv, kv, vv, mod_v = self._visual_qkv(x_visual, cond_visual, ctx)
        out_visual = compilation.attend(ctx.attention, (qv, kv, vv), cached)
        return self.visual.finish(x_visual, out_visual.flatten(-2), mod_v, ctx.visual)

class MultiStageMMDiT(PackedTransformer):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.init_seed = draw_init_seed()
        self.config = cfg = config
        d = cfg.width
        patch_dim = cfg.in_channels * cfg.patch_size**2
        self.visual_in = nn.Linear(patch_dim, d)
        self.text_in = nn.Linear(cfg.text_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(TIMESTEP_FEATURES, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_mlp = nn.Sequential(nn.Linear(cfg.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList([MMDiTBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth)])
        self.final_modulation = nn.Linear(d, 2 * d)
        self.visual_out = nn.Linear(d, patch_dim)
        self.init_weights()

    def init_kinds(self) -> dict[str, str]:
        """Every init choice in one place.

        - Linear layers: Xavier-uniform weights, zero biases (as DiT); norm scales one.
        - Timestep and pooled-text MLPs: normal(0, 0.02), so conditioning starts small but not zero.
        - Every adaLN modulation layer and the output layer: zero, so each block starts as the identity
          (gates are 0) and the model's first prediction is 0.
        """
        normal = [layer for mlp in (self.time_mlp, self.pooled_mlp) for layer in mlp if isinstance(layer, nn.Linear)]
        zero = [self.final_modulation, self.visual_out]
        for block in self.blocks:
            zero += [block.text.modulation, block.visual.modulation]
        return parameter_kinds(self, normal, zero)

    def rope_for(self, layout: Layout, device: torch.device) -> torch.Tensor:
        """Rotations at the packed positions: full-resolution token units, coarse tokens at their fine tokens' centre."""
        return rope_tables(layout.positions.to(device), self.config.axes(), self.config.rope_theta)

    def forward(self, batch: PackedBatch, context: Context | None = None, prefix: PrefixCache | None = None,
                record: list | None = None) -> torch.Tensor:
        """batch -> velocity tokens (Nv, C * p * p), aligned with batch.visual.

        prefix: text and history computed earlier by ``prefix_cache``; ``batch`` then holds only the predicted
        latents (no history) of the same segments, and its text is not recomputed.
        record: a list that receives every block's (k_text, v_text, k_visual, v_visual).
        """
        ctx = self._context(batch, context, prefix)
        layout = batch.layout
        device = batch.visual.device
        run_segment = layout.run_segment.to(device)
        cond = self.time_mlp(timestep_embedding(batch.timestep)) + self.pooled_mlp(batch.pooled)[run_segment]
        cond = F.silu(cond)  # (R, D), shared by every modulation layer
        x_visual = self.visual_in(ctx.local_visual(batch.visual))  # (Nv, D), this rank's rows if the sequence is split
        if prefix is not None:
            for block, cached in zip(self.blocks, prefix.blocks):
                x_visual = block.forward_prefixed(x_visual, cond, ctx, cached)
        else:
            cond_text = cond[layout.text_run.to(device)]  # (B, D)
            x_text = self.text_in(ctx.local_text(batch.text))  # (Nt, D)
            x_text, x_visual = self.run_blocks(self.blocks, x_text, x_visual, cond_text, cond, ctx, record)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        h = modulated(ctx.visual, x_visual, shift, scale)
        return ctx.whole_visual(self.visual_out(h))  # (Nv, C * p * p)
