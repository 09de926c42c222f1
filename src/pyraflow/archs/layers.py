"""The layers of the released Pyramid Flow transformers, named as in their checkpoints (diffusers' names), computing
over pyraflow's packed streams: text tokens (Nt, D) and visual tokens (Nv, D), conditioning per run (R, D).

Every modulation is applied per conditioning run through the Context's RunBroadcast (per segment for text), so a
packed batch of many segments computes what each segment computes alone. ``pyraflow.archs.flux`` and
``pyraflow.archs.sd3`` assemble these into the two models.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyraflow import compilation
from pyraflow.archs.base import (Context, PackedTransformer, apply_rope, gated, modulated, parameter_kinds, rms_norm,
                                 timestep_embedding)
from pyraflow.packing import PackedBatch

class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, over the head dimension."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Projection(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """temb = embed(256-channel sinusoid of the timestep, cos first) + embed(pooled text), one per run."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = Projection(256, dim)
        self.text_embedder = Projection(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype)) + self.text_embedder(pooled)


class Modulation(nn.Module):
    """``linear(silu(temb))`` cut into ``chunks`` vectors (AdaLayerNormZero: 6, ...Single: 3, ...Continuous: 2)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.chunks = chunks

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cond: silu(temb) (R, D)."""
        return self.linear(cond).chunk(self.chunks, dim=-1)


class FeedForward(nn.Module):
    """net.0.proj -> GELU (tanh) -> net.2."""

    def __init__(self, dim: int, mult: float = 4.0):
        super().__init__()
        hidden = int(dim * mult)
        self.net = nn.ModuleList([_GeluProjection(dim, hidden), nn.Dropout(0.0), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class JointAttention(nn.Module):
    """q/k/v of the visual stream (to_*) and of the text stream (add_*_proj), per-head RMSNorm, RoPE on the visual
    tokens (text sits at position 0 on every axis, where the rotation is the identity), joint attention per segment,
    and the output projections (to_out.0, to_add_out; the latter absent where the text output is never read)."""

    def __init__(self, dim: int, heads: int, eps: float, text_norm_names: tuple[str, str], text_out: bool = True,
                 visual_out: bool = True):
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.text_norm_names = text_norm_names
        if text_norm_names:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            for name in text_norm_names:
                setattr(self, name, RMSNorm(head_dim, eps))
        if visual_out:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        if text_out:
            self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def visual_qkv(self, x: torch.Tensor, rope: torch.Tensor | None):
        """q, k, v (N, H, Dh) of the to_* projections; rope None: tokens at id 0 (text), where RoPE is the identity."""
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is None:
            return q, k, v
        return apply_rope(q, rope), apply_rope(k, rope), v

    def text_qkv(self, c: torch.Tensor):
        norm_q, norm_k = (getattr(self, name) for name in self.text_norm_names)
        q, k, v = self._heads(self.add_q_proj(c)), self._heads(self.add_k_proj(c)), self._heads(self.add_v_proj(c))
        return norm_q(q), norm_k(k), v


def reference_runs(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Host index tensors: for every conditioning run, the run whose timestep conditions it; for every segment, the
    run its text follows. The reference has one timestep per row, for its text, its history clips and its current
    latent alike, so history runs and text follow the segment's first predicted run."""
    history = torch.tensor([len(parts) - 1 for parts in layout.parts])
    first_predicted = layout.text_run + history  # text_run is the segment's first run
    segment = layout.run_segment
    position = torch.arange(len(segment)) - layout.text_run[segment]
    source = torch.where(position < history[segment], first_predicted[segment], torch.arange(len(segment)))
    return source, first_predicted


def conditioning(model: nn.Module, batch, layout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(temb) per run (R, D) and per segment for the text (B, D), every run at its segment's current timestep."""
    source, text_run = reference_runs(layout)
    run_segment = layout.run_segment.to(device)
    temb = model.time_text_embed(batch.timestep[source.to(device)], batch.pooled[run_segment])
    cond = F.silu(temb)
    return cond, cond[text_run.to(device)]


class DoubleStreamBlock(nn.Module):
    """A block with separate text and visual weights and one joint attention per segment: Flux's double-stream
    block and SD3's joint block (the same computation; they differ in the q/k norm eps and names). ``text_pre_only``:
    the last SD3 block, whose text output is never read (continuous adaLN on the text, no text output layers)."""

    def __init__(self, dim: int, heads: int, qk_eps: float, text_norm_names: tuple[str, str], text_pre_only: bool = False):
        super().__init__()
        self.text_pre_only = text_pre_only
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 2 if text_pre_only else 6)
        self.attn = JointAttention(dim, heads, qk_eps, text_norm_names, text_out=not text_pre_only)
        self.ff = FeedForward(dim)
        if not text_pre_only:
            self.ff_context = FeedForward(dim)

    def _visual(self, x, cond, ctx: Context):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(cond)
        return self.attn.visual_qkv(modulated(ctx.visual, x, shift, scale), ctx.rope), (gate, shift_mlp, scale_mlp, gate_mlp)

    def _finish_visual(self, x, out, mod, ctx: Context):
        gate, shift_mlp, scale_mlp, gate_mlp = mod
        x = gated(ctx.visual, x, self.attn.to_out[0](out.flatten(-2)), gate)
        return gated(ctx.visual, x, self.ff(modulated(ctx.visual, x, shift_mlp, scale_mlp)), gate_mlp)

    def forward(self, c, x, cond_text, cond, ctx: Context, record: list | None = None):
        visual_qkv, mod = self._visual(x, cond, ctx)
        if self.text_pre_only:
            scale, shift = self.norm1_context(cond_text)
        else:
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1_context(cond_text)
        text_qkv = self.attn.text_qkv(modulated(ctx.text, c, shift, scale))
        if record is not None:
            record.append((text_qkv[1], text_qkv[2], visual_qkv[1], visual_qkv[2]))
        out_text, out_visual = compilation.attend(ctx.attention, text_qkv, visual_qkv)
        x = self._finish_visual(x, out_visual, mod, ctx)
        if self.text_pre_only:
            return c, x
        c = gated(ctx.text, c, self.attn.to_add_out(out_text.flatten(-2)), gate)
        c = gated(ctx.text, c, self.ff_context(modulated(ctx.text, c, shift_mlp, scale_mlp)), gate_mlp)
        return c, x


def patch_order(channels: int, patch: int) -> torch.Tensor:
    """Index that takes pyraflow's patch vector (c, p, q) to the reference's (p, q, c)."""
    return torch.arange(channels * patch * patch).view(channels, patch, patch).permute(1, 2, 0).reshape(-1)


def reference_init_kinds(model: nn.Module, zero: list[nn.Module] = ()) -> dict[str, str]:
    """The reference's init: Xavier-uniform linear (and patch conv) weights with zero biases, normal(0, 0.02)
    conditioning and text embedders, zero adaLN and output layers (every block starts as the identity); ``zero``
    adds an architecture's own zeroed layers."""
    embed = model.time_text_embed
    normal = [embed.timestep_embedder.linear_1, embed.timestep_embedder.linear_2, embed.text_embedder.linear_1,
              embed.text_embedder.linear_2, model.context_embedder]
    zero = [model.norm_out.linear, model.proj_out, *zero]
    for module in model.modules():
        if isinstance(module, DoubleStreamBlock):
            zero += [module.norm1.linear, module.norm1_context.linear]
    return parameter_kinds(model, normal, zero)


class ReferenceTransformer(PackedTransformer):
    """What both released architectures share: text at temporal step 0 (it sees the first frame), every token of a
    sample conditioned on the sample's current timestep (so text and history change every step and are not
    cached), the stream through ``blocks``, the continuous adaLN and ``proj_out`` written in the reference's patch
    order (``from_reference`` takes it to pyraflow's). Subclasses define ``embed`` and ``blocks``."""

    text_step = 0
    caches_history = False

    def embed(self, batch: PackedBatch, ctx: Context) -> torch.Tensor:
        """The visual tokens' embeddings, this rank's rows (``ctx.local_visual``)."""
        raise NotImplementedError

    def forward(self, batch: PackedBatch, context: Context | None = None, prefix=None,
                record: list | None = None) -> torch.Tensor:
        """batch -> velocity tokens (Nv, C * p * p) in pyraflow's patch order, aligned with batch.visual."""
        if prefix is not None:
            raise ValueError(f"model.arch={self.arch!r} conditions text and history on the current timestep; it takes "
                             "no history cache.")
        ctx = self._context(batch, context, None)
        cond, cond_text = conditioning(self, batch, batch.layout, batch.visual.device)
        _, x = self.run_blocks(self.blocks, self.context_embedder(ctx.local_text(batch.text)), self.embed(batch, ctx),
                               cond_text, cond, ctx, record)
        scale, shift = self.norm_out(cond)
        out = self.proj_out(modulated(ctx.visual, x, shift, scale)).index_select(-1, self.from_reference)
        return ctx.whole_visual(out)
