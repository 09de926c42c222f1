"""What every architecture shares (pyraflow's MMDiT and the released flux / sd3 transformers): the packed model's
base class, the per-batch Context, per-run modulation broadcast, RoPE, the timestep embedding and the adaLN helpers,
each written once.

A model takes one PackedBatch and returns one tensor aligned with its visual tokens; it knows nothing of stages,
noise or losses: the timestep (one per conditioning run) says which stage a segment is in, and positions place coarse
tokens among fine ones. For video units, ``prefix_cache`` runs the text and history of a unit once and
``forward(..., prefix=cache)`` then runs only the predicted tokens at each denoising step (exact under
temporal-causal attention).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyraflow.attention import (Attention, PrefixAttention, SequenceShard, ShardedAttention, build_attention,
                                 resolve_backend)
from pyraflow.config import ModelConfig
from pyraflow.packing import Layout, PackedBatch
from pyraflow.weights import CONFIG, MODEL, read_model_config, read_tensors, save_model, weight_files

TIMESTEP_FEATURES = 256  # sinusoidal features of the timestep before the conditioning MLP
MAX_BROADCAST_BLOCKS = 8  # above this many blocks of equal-length runs, one gather beats a loop over blocks

def draw_init_seed() -> int:
    """The seed of a new model's initial weights, from torch's global generator (so ``torch.manual_seed`` fixes it),
    drawn on the CPU whatever the default device (a model built on the meta device draws the same seed)."""
    return int(torch.randint(0, 2**31, (), device="cpu"))


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for each named tensor, so a tensor's initial value depends on the seed and its name
    only: not on which rank draws it, in which order, or what else the model holds."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def initial_tensor(kind: str, shape: torch.Size | tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """A parameter's initial value (on the CPU) by its kind: ``xavier`` (uniform, fan-in = all but the first
    dimension, as xavier_uniform_ on the (out, -1) view), ``normal`` (std 0.02), ``zeros`` or ``ones``."""
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    generator = tensor_generator(seed, name)
    if kind == "normal":
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    if kind == "xavier":
        fan_out = shape[0]
        fan_in = math.prod(shape) // fan_out
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    raise ValueError(f"unknown initialisation {kind!r} for {name}")


def parameter_kinds(model: nn.Module, normal: list[nn.Module], zero: list[nn.Module]) -> dict[str, str]:
    """Every parameter's init kind: linear and convolution weights Xavier with zero biases, norm weights one; then
    ``normal`` layers' weights normal(0, 0.02) and ``zero`` layers' weights and biases zero."""
    kinds, names = {}, {id(m): n for n, m in model.named_modules()}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                kinds[name] = "xavier" if name.endswith("weight") else "zeros"
            elif name.endswith("weight"):  # norm scales
                kinds[name] = "ones"
            else:
                raise NotImplementedError(f"no initialisation rule for {name} ({type(module).__name__})")
    for layer in normal:
        kinds[f"{names[id(layer)]}.weight"] = "normal"
    for layer in zero:
        for name, _ in layer.named_parameters(prefix=names[id(layer)]):
            kinds[name] = "zeros"
    return kinds


class RunBroadcast:
    """Applies per-run vectors (R, D) to the tokens of each run (N, D).

    Runs are consecutive slices of a stream. Where they come in a few blocks of equal length, each block
    is viewed as (runs, length, D) and the vectors broadcast over it — no per-token copy. Where runs of
    many different lengths alternate (text of varied lengths), more than ``max_blocks`` blocks, one gather
    to (N, D) is cheaper than a Python loop over blocks. Gathers use index_select, whose backward is an
    index_add (``v[index]``'s backward, index_put with accumulation, is much slower on CPU).
    """

    def __init__(self, run_lengths: list[int], device: torch.device, max_blocks: int = MAX_BROADCAST_BLOCKS,
                 first_run: int | None = None):
        """first_run: where run_lengths are some of the runs (a rank's part of a split sequence; ``runs_within``), the
        index of the first among the per-run vectors, which are then cut to these runs."""
        self.window = None if first_run is None else (first_run, len(run_lengths))
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
        if self.window is not None:
            per_run = tuple(v.narrow(0, *self.window) for v in per_run)
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


def runs_within(run_lengths: list[int], start: int, end: int) -> tuple[list[int], int]:
    """The runs covering tokens [start, end) of a stream, clipped to that span (empty runs between kept, so run
    indices stay consecutive), and the index of the first."""
    offsets = [0]
    for length in run_lengths:
        offsets.append(offsets[-1] + length)
    covering = [r for r in range(len(run_lengths)) if offsets[r] < end and offsets[r + 1] > start]
    first, last = covering[0], covering[-1]
    return [min(offsets[r + 1], end) - max(offsets[r], start) for r in range(first, last + 1)], first


LN_EPS = 1e-6  # every LayerNorm here and in the released models: no affine, eps 1e-6


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: LN(x) * (1 + scale) + shift."""
    return layer_norm(x) * (1 + scale) + shift


def gated_add(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return residual + gate * y


def modulated(runs: RunBroadcast, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """norm_modulate with the per-run (R, D) vectors broadcast over their runs' tokens."""
    return runs.apply(norm_modulate, (x,), (shift, scale))


def gated(runs: RunBroadcast, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, the per-run gate broadcast over its runs' tokens."""
    return runs.apply(gated_add, (x, y), (gate,))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with the weight in x's dtype: under bf16 autocast the fused kernel refuses
    (and warns about) a bf16 input with an fp32 weight."""
    return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps)


class Context:
    """What every block needs about the batch, computed once per batch and reusable across forwards.

    compiled: for compiled blocks, modulation reaches its tokens through one index gather, which the compiler fuses
    into the kernels that read it.
    shard: under sequence parallelism, this rank's part of the group: the blocks then see only this rank's contiguous
    rows of each stream (``local_text`` / ``local_visual`` cut them), modulation and RoPE are cut to match, attention
    exchanges rows for heads around the backend, and ``whole_visual`` gathers the model's output."""

    def __init__(self, layout: Layout, attention: Attention | PrefixAttention, rope: torch.Tensor, device,
                 compiled: bool = False, shard: SequenceShard | None = None):
        self.layout = layout
        self.shard = shard
        max_blocks = 0 if compiled else MAX_BROADCAST_BLOCKS
        text_runs, visual_runs = (layout.text_lengths, None), (layout.run_lengths, None)
        self.text_rows = self.visual_rows = None
        if shard is not None:
            if min(layout.num_text, layout.num_visual) < shard.ranks:
                raise ValueError(f"a batch of {layout.num_text} text and {layout.num_visual} visual tokens cannot be "
                                 f"split over {shard.ranks} ranks (train.sequence_parallel): raise the token budget.")
            text_sizes, t0, t1 = shard.span(layout.num_text)
            self.visual_sizes, v0, v1 = shard.span(layout.num_visual)
            self.text_rows, self.visual_rows = slice(t0, t1), slice(v0, v1)
            attention = ShardedAttention(attention, shard, text_sizes, self.visual_sizes)
            rope = rope[v0:v1]
            text_runs = runs_within(layout.text_lengths, t0, t1)
            visual_runs = runs_within(layout.run_lengths, v0, v1)
        self.attention = attention
        self.rope = rope  # complex rotations: (Nv, 1, head_dim / 2), this rank's rows
        self.visual = RunBroadcast(visual_runs[0], device, max_blocks, visual_runs[1])
        self.text = RunBroadcast(text_runs[0], device, max_blocks, text_runs[1])

    def local_text(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a (Nt, ...) text-stream tensor (all of them without sequence parallelism)."""
        return x if self.text_rows is None else x[self.text_rows]

    def local_visual(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a (Nv, ...) visual-stream tensor."""
        return x if self.visual_rows is None else x[self.visual_rows]

    def whole_visual(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a visual-stream output, in stream order (the model's output is whole on every rank)."""
        return x if self.shard is None else self.shard.gather(x, self.visual_sizes)


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

    sequence_shard: SequenceShard | None = None  # set by a sequence-parallel run (pyraflow.train.parallelize)
    init_seed: int  # set by each architecture's constructor (draw_init_seed) before it builds its layers

    def rope_for(self, layout: Layout, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def init_kinds(self) -> dict[str, str]:
        """Every parameter's initialisation kind (``initial_tensor``), by name."""
        raise NotImplementedError

    def initial_value(self, name: str) -> torch.Tensor:
        """The initial value of parameter ``name``, whole, on the CPU: the same on every rank, so a sharded run cuts
        its rows from it instead of building the model on one rank."""
        return initial_tensor(self.init_kinds()[name], self.get_parameter(name).shape, self.init_seed, name)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter, one tensor at a time, from its own generator (parameters on the meta device are
        left for the run that shards them to fill)."""
        kinds = self.init_kinds()
        for name, parameter in self.named_parameters():
            if not parameter.is_meta:
                parameter.copy_(initial_tensor(kinds[name], parameter.shape, self.init_seed, name))

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
        shard = self.sequence_shard
        if prefix is not None and shard is not None:
            raise ValueError("a history cache is for sampling; sample without train.sequence_parallel.")
        if prefix is not None:
            attention = PrefixAttention(layout, prefix.layout, device)
        else:
            attention = build_attention(layout, resolve_backend(cfg.attention, device, dtype), cfg.temporal_causal, device,
                                        text_step=self.text_step)
        return Context(layout, attention, self.rope_for(layout, device), device, self.compiled, shard)

    def _context(self, batch: PackedBatch, context: Context | None, prefix: PrefixCache | None) -> Context:
        self._check(batch)
        device = batch.visual.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else batch.visual.dtype
        ctx = context or self.prepare(batch.layout, device, dtype, prefix)
        if prefix is not None and not isinstance(ctx.attention, PrefixAttention):
            raise ValueError("a prefix cache needs a context prepared with it: model.prepare(layout, device, prefix=cache).")
        return ctx

    def run_blocks(self, blocks, x_text, x_visual, cond_text, cond, ctx: Context, record: list | None):
        """Both streams through ``blocks`` (activation checkpointing, where a run asks for it, is applied to the
        blocks by pyraflow.train.parallelize)."""
        for block in blocks:
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
    def save_pretrained(self, directory: str | Path, weights: str = MODEL) -> None:
        """Write a model directory (config.json and the weights), each file published atomically."""
        save_model(self.config, self.state_dict(), directory, weights)

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str = MODEL, **overrides) -> "PackedTransformer":
        """Load a model directory (or a pyraflow checkpoint, whose EMA weights are ``ema.safetensors``);
        ``overrides`` change runtime-only fields (e.g. attention). Every way the files can be wrong (missing, not
        JSON, unknown fields, unreadable or mismatched weights) is a named error."""
        directory = Path(directory)
        config = ModelConfig(**{**read_model_config(directory / CONFIG), **overrides})
        files = weight_files(directory, weights)
        if config.arch != cls.arch:
            raise ValueError(f"{directory} holds a model.arch={config.arch!r} model, not {cls.arch!r}; load it with "
                             "pyraflow.archs.load_model, which picks the class.")
        model = cls(config)
        state = dict(read_tensors(files))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{directory / weights} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
        return model
