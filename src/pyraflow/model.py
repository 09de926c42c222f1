"""The multi-stage MMDiT: one SD3-style transformer over packed segments of any stage.

    v = model(batch)  # batch: PackedBatch; v: (Nv, C * p * p), row i = visual token i

The model knows nothing of stages, noise or losses: the timestep (one per conditioning run) already
says which stage a segment is in, and positions already place coarse tokens among fine ones.

Text and visual tokens have separate weights (two streams) and meet in joint attention inside each
segment. Conditioning c = embed(timestep) + embed(pooled text) drives adaLN-Zero per segment, or per
frame where a segment carries one timestep per frame (a *run*). Modulation vectors are broadcast over
each group of equal-shape runs rather than copied to every token.

For video units, ``prefix_cache`` runs the text and history of a unit once and ``forward(..., prefix=cache)``
then runs only the predicted tokens at each denoising step (exact under temporal-causal attention).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pyraflow.attention import Attention, PrefixAttention, build_attention, resolve_backend
from pyraflow import compilation
from pyraflow.config import ModelConfig
from pyraflow.packing import Layout, PackedBatch
from pyraflow.storage import atomic_path

TIMESTEP_FEATURES = 256  # sinusoidal features of the timestep before the conditioning MLP
MAX_BROADCAST_BLOCKS = 8  # above this many blocks of equal-length runs, one gather beats a loop over blocks
WEIGHTS = "model.safetensors"


class RunBroadcast:
    """Applies per-run vectors (R, D) to the tokens of each run (N, D).

    Runs are consecutive slices of a stream. Where they come in a few blocks of equal length, each block
    is viewed as (runs, length, D) and the vectors broadcast over it — no per-token copy. Where runs of
    many different lengths alternate (text of varied lengths), more than ``max_blocks`` blocks, one gather
    to (N, D) is cheaper than a Python loop over blocks. Gathers use index_select, whose backward is an
    index_add (``v[index]``'s backward, index_put with accumulation, is much slower on CPU).
    """

    def __init__(self, run_lengths: list[int], device: torch.device, max_blocks: int = MAX_BROADCAST_BLOCKS):
        blocks: list[list[int]] = []  # [token_start, token_end, run_start, run_end, length]
        token = 0
        for r, length in enumerate(run_lengths):
            if blocks and blocks[-1][4] == length:
                blocks[-1][1] += length
                blocks[-1][3] += 1
            else:
                blocks.append([token, token + length, r, r + 1, length])
            token += length
        self.blocks = blocks
        self.token_sizes = [b[1] - b[0] for b in blocks]
        self.run_sizes = [b[3] - b[2] for b in blocks]
        self.index = None
        if len(blocks) > max_blocks:
            lengths = torch.tensor(run_lengths, device=device)
            self.index = torch.repeat_interleave(torch.arange(len(run_lengths), device=device), lengths)

    def apply(self, fn, tokens: tuple[torch.Tensor, ...], per_run: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """fn(*tokens, *per_run) evaluated with per-run vectors broadcast to their tokens."""
        if self.index is not None:
            return fn(*tokens, *(v.index_select(0, self.index) for v in per_run))
        if len(self.blocks) == 1:
            _, _, r0, r1, length = self.blocks[0]
            tk = (x.view(r1 - r0, length, x.shape[-1]) for x in tokens)
            return fn(*tk, *(v.unsqueeze(1) for v in per_run)).flatten(0, 1)
        # split (not slicing): its backward is one cat instead of a zero-filled copy per piece
        token_parts = [x.split(self.token_sizes) for x in tokens]
        run_parts = [v.split(self.run_sizes) for v in per_run]
        out = []
        for i, (_, _, r0, r1, length) in enumerate(self.blocks):
            tk = (parts[i].view(r1 - r0, length, parts[i].shape[-1]) for parts in token_parts)
            out.append(fn(*tk, *(parts[i].unsqueeze(1) for parts in run_parts)).flatten(0, 1))
        return torch.cat(out)


def _gated_add(residual, y, gate):
    return residual + gate * y


def _rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """norm(x) with the weight in x's dtype: under bf16 autocast the fused kernel refuses (and warns about) a
    bf16 input with an fp32 weight."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def _norm_modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class Context:
    """What every block needs about the batch, computed once per batch and reusable across forwards.

    compiled: for compiled blocks, modulation reaches its tokens through one index gather, which the compiler fuses
    into the kernels that read it."""

    def __init__(self, layout: Layout, attention: Attention | PrefixAttention, rope: torch.Tensor, device,
                 compiled: bool = False):
        self.layout = layout
        self.attention = attention
        self.rope = rope  # complex rotations: (Nv, 1, head_dim / 2)
        max_blocks = 0 if compiled else MAX_BROADCAST_BLOCKS
        self.visual = RunBroadcast(layout.run_lengths, device, max_blocks)
        self.text = RunBroadcast(layout.text_lengths, device, max_blocks)


@dataclass
class PrefixCache:
    """Keys and values of the text and history tokens at every block, computed once per video unit.

    Valid because under temporal-causal attention text sees only text and history sees only text and
    earlier units, and both are conditioned on their own timesteps: nothing in them depends on the unit
    being denoised.
    """

    layout: Layout
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # (k_text, v_text, k_hist, v_hist)


def rope_tables(positions: torch.Tensor, axes: list[int], theta: float) -> torch.Tensor:
    """Unit complex rotations (N, 1, head_dim/2) for 3-axis RoPE at float positions (N, 3)."""
    angles = []
    for axis, dim in enumerate(axes):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
        angles.append(positions[:, axis : axis + 1].float() * inv_freq)
    angle = torch.cat(angles, dim=-1).unsqueeze(1)
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (N, H, Dh) by the angles of ``rotation`` (N, 1, Dh/2),
    as one complex product (fewer kernels, forward and backward, than real products and a stack). Inside a compiled
    block the same rotation is written in real arithmetic, which inductor fuses (it generates no complex kernels)."""
    if torch.compiler.is_compiling():
        pairs = x.float().unflatten(-1, (-1, 2))
        cos, sin = rotation.real, rotation.imag
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


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
        h = runs.apply(_norm_modulate, (x,), (mod[0], mod[1]))
        q, k, v = self.qkv(h).unflatten(-1, (3, heads, -1)).unbind(-3)  # (N, H, Dh) each
        return _rms_norm(q, self.q_norm), _rms_norm(k, self.k_norm), v, mod

    def finish(self, x, attn_out, mod, runs: RunBroadcast):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = runs.apply(_gated_add, (x, self.proj(attn_out)), (gate_msa,))
        h = runs.apply(_norm_modulate, (x,), (shift_mlp, scale_mlp))
        return runs.apply(_gated_add, (x, self.mlp(h)), (gate_mlp,))


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


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps on the 0..1000 axis: (R,) -> (R, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PackedTransformer(nn.Module):
    """What every architecture shares: it takes one PackedBatch and returns one tensor aligned with its visual
    tokens; per batch it prepares the attention (any backend), its RoPE rotations and the modulation layout; it caches
    a video unit's text and history keys/values; it saves and loads itself. Subclasses define ``rope_for`` (their
    positions), ``text_step`` (text's causal step) and ``forward``."""

    config: ModelConfig
    arch = "mmdit"  # the model.arch this class implements
    text_step = -1  # text sees only text
    compiled = False  # blocks compiled by pyraflow.compilation.compile_blocks
    caches_history = True  # text and history do not depend on the predicted latent's timestep, so can be cached

    def rope_for(self, layout: Layout, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, batch: PackedBatch) -> None:
        cfg = self.config
        patch_dim = cfg.in_channels * cfg.patch_size**2
        if batch.layout.patch_size != cfg.patch_size:
            raise ValueError(f"batch was packed with patch size {batch.layout.patch_size}, model uses {cfg.patch_size}.")
        if batch.visual.shape[-1] != patch_dim:
            raise ValueError(
                f"visual tokens are {batch.visual.shape[-1]} wide; the model expects {patch_dim} "
                f"({cfg.in_channels} channels x {cfg.patch_size}x{cfg.patch_size} patches)."
            )
        if batch.text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text tokens are {batch.text.shape[-1]} wide; the model expects {cfg.text_dim}.")
        if batch.pooled.shape[-1] != cfg.pooled_dim:
            raise ValueError(f"pooled text is {batch.pooled.shape[-1]} wide; the model expects {cfg.pooled_dim}.")

    def prepare(self, layout: Layout, device: torch.device, dtype: torch.dtype = torch.float32,
                prefix: PrefixCache | None = None) -> Context:
        """Attention, RoPE tables and modulation layout for one batch (reusable across forwards)."""
        cfg = self.config
        if prefix is not None:
            attention = PrefixAttention(layout, prefix.layout, device)
        else:
            attention = build_attention(layout, resolve_backend(cfg.attention, device, dtype), cfg.temporal_causal, device,
                                        text_step=self.text_step)
        return Context(layout, attention, self.rope_for(layout, device), device, self.compiled)

    def _context(self, batch: PackedBatch, context: Context | None, prefix: PrefixCache | None) -> Context:
        self._check(batch)
        device = batch.visual.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else batch.visual.dtype
        ctx = context or self.prepare(batch.layout, device, dtype, prefix)
        if prefix is not None and not isinstance(ctx.attention, PrefixAttention):
            raise ValueError("a prefix cache needs a context prepared with it: model.prepare(layout, device, prefix=cache).")
        return ctx

    def run_blocks(self, blocks, x_text, x_visual, cond_text, cond, ctx: Context, record: list | None):
        """Both streams through ``blocks``; the first checkpoint_fraction of them recompute their activations in
        backward."""
        n_checkpointed = round(self.config.checkpoint_fraction * len(blocks))
        for i, block in enumerate(blocks):
            if i < n_checkpointed and torch.is_grad_enabled():
                x_text, x_visual = checkpoint(block, x_text, x_visual, cond_text, cond, ctx, use_reentrant=False)
            else:
                x_text, x_visual = block(x_text, x_visual, cond_text, cond, ctx, record)
        return x_text, x_visual

    @torch.no_grad()
    def prefix_cache(self, prefix: PackedBatch) -> PrefixCache:
        """Run the text and history of a video unit once and keep every block's keys and values."""
        if not self.config.temporal_causal:
            raise ValueError("a history cache needs model.temporal_causal: true (history must not see the unit).")
        if not self.caches_history:
            raise ValueError(f"model.arch={self.arch!r} conditions its text and history on the current timestep (as the "
                             "released model was trained), so they change every step: sample without the history cache.")
        record: list = []
        self.forward(prefix, record=record)
        return PrefixCache(prefix.layout, record)

    # ----- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, weights: str = WEIGHTS) -> None:
        """Write config.json and the weights (safetensors), each published atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_path(directory / "config.json") as tmp:
            tmp.write_text(json.dumps(asdict(self.config), indent=2))
        with atomic_path(directory / weights) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str = WEIGHTS, **overrides) -> "PackedTransformer":
        """Load a model written by save_pretrained (or a pyraflow checkpoint, whose EMA weights are
        ``ema.safetensors``); ``overrides`` change runtime-only fields (e.g. attention). Every way the files can
        be wrong (missing, not JSON, unknown fields, unreadable or mismatched weights) is a named error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / weights
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; point at a directory written by save_pretrained.")
        config = ModelConfig(**{**read_model_config(config_path), **overrides})
        if config.arch != cls.arch:
            raise ValueError(f"{directory} holds a model.arch={config.arch!r} model, not {cls.arch!r}; load it with "
                             "pyraflow.archs.load_model, which picks the class.")
        model = cls(config)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights_path} cannot be read ({err}); the checkpoint is corrupt.") from err
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        return model


class MultiStageMMDiT(PackedTransformer):
    def __init__(self, config: ModelConfig):
        super().__init__()
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

    def init_weights(self) -> None:
        """Every init choice in one place.

        - Linear layers: Xavier-uniform weights, zero biases (as DiT).
        - Timestep and pooled-text MLPs: normal(0, 0.02), so conditioning starts small but not zero.
        - Every adaLN modulation layer and the output layer: zero, so each block starts as the identity
          (gates are 0) and the model's first prediction is 0.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for mlp in (self.time_mlp, self.pooled_mlp):
            for layer in mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)
        zero = [self.final_modulation, self.visual_out]
        for block in self.blocks:
            zero += [block.text.modulation, block.visual.modulation]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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
        x_visual = self.visual_in(batch.visual)  # (Nv, D)
        if prefix is not None:
            for block, cached in zip(self.blocks, prefix.blocks):
                x_visual = block.forward_prefixed(x_visual, cond, ctx, cached)
        else:
            cond_text = cond[layout.text_run.to(device)]  # (B, D)
            x_text = self.text_in(batch.text)  # (Nt, D)
            x_text, x_visual = self.run_blocks(self.blocks, x_text, x_visual, cond_text, cond, ctx, record)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        h = ctx.visual.apply(_norm_modulate, (x_visual,), (shift, scale))
        return self.visual_out(h)  # (Nv, C * p * p)


LEGACY_MODEL_FIELDS = {"modulation": "broadcast"}  # fields of older checkpoints that are now always this value


def read_model_config(path: Path) -> dict:
    """The fields of a model config.json, checked to be ModelConfig fields."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    for key, value in LEGACY_MODEL_FIELDS.items():
        if raw.get(key, value) == value:
            raw.pop(key, None)
    unknown = set(raw) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"{path} has unknown model fields {sorted(unknown)}; was it written by pyraflow?")
    return raw


def linear_flops_per_token(cfg: ModelConfig) -> float:
    """Forward multiply-add FLOPs (x2) of every linear layer per visual or text token per block."""
    d = cfg.width
    return 2 * (3 * d * d + d * d + 2 * d * int(d * cfg.mlp_ratio))


def estimate_activation_bytes(cfg: ModelConfig, segment_lengths: list[int], bytes_per_element: int = 2,
                              checkpoint_fraction: float | None = None) -> int:
    """Rough activation memory of one training step: what autograd keeps per token per block (norm outputs, q/k/v,
    attention output, MLP input and hidden, residuals: about (16 + 2 * mlp_ratio) * width values), times tokens and
    blocks; a checkpointed block keeps only its input (width values per token) and one block is recomputed at a
    time. Attention is assumed flash-style (no L x L scores kept)."""
    fraction = cfg.checkpoint_fraction if checkpoint_fraction is None else checkpoint_fraction
    tokens = sum(segment_lengths)
    per_token = (16 + 2 * cfg.mlp_ratio) * cfg.width
    blocks = cfg.depth + cfg.single_depth
    checkpointed = round(fraction * blocks)
    kept = (blocks - checkpointed) * per_token + checkpointed * cfg.width + (per_token if checkpointed else 0)
    return int(tokens * kept * bytes_per_element)
