"""The standard bench setting and one training step in each layout compared by ``pyraflow bench``.

The standard bench config (fixed so figures compare across versions): MMDiT with 4 blocks, width 256
(4 heads of 64), patch 2, 4 latent channels, 3 stages at 8x8 / 16x16 / 32x32 latent, text of 16-32
valid tokens of width 384, mix 25/50/25 by samples: 16 samples (4 / 8 / 4) = 1,600 visual tokens.

Timing alternates the variants round by round in one process (so drift hits all alike) and reports
medians. Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU an exact accounting of
parameters, gradients, AdamW state and the tensors autograd saves for backward (see accounted_memory_mb).
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch

from pyraflow.bench.baselines import DenseMaskAttention, RowAttention, per_token_modulation
from pyraflow.compilation import compile_blocks
from pyraflow.config import ModelConfig
from pyraflow.archs.mmdit import MultiStageMMDiT
from pyraflow.plan import linear_flops_per_token
from pyraflow.packing import PackedBatch, Sample, pack
from pyraflow.train.optim import make_optimizer

STANDARD_STAGES = [(0, 8, 4), (1, 16, 8), (2, 32, 4)]  # (stage, latent side, samples)
MAX_TEXT = 32


def standard_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(in_channels=4, patch_size=2, width=256, depth=4, num_heads=4, text_dim=384,
                                 pooled_dim=384), **overrides})


def standard_samples(seed: int = 0, pad_text: bool = False, all_at_longest: bool = False,
                     scale: int = 1) -> list[Sample]:
    """The standard batch's 16 samples. pad_text: text padded to 32 tokens (as a fixed-length encoder
    would give); all_at_longest: every sample at the longest stage's size (padding's cost); scale:
    latent sides times ``scale`` (scale 4: the high stage is 128x128 latent = 4,096 tokens, 1024 px
    through an 8x VAE), for how the layouts compare as segments grow."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    longest = STANDARD_STAGES[-1][1] * scale
    for stage, side, count in STANDARD_STAGES:
        side *= scale
        for _ in range(count):
            length = int(torch.randint(16, MAX_TEXT + 1, (1,), generator=g))
            text = torch.randn(length, 384, generator=g)
            if pad_text or all_at_longest:
                text = torch.cat([text, torch.zeros(MAX_TEXT - length, 384)])
            latent = torch.randn(4, 1, side, side, generator=g)
            if all_at_longest:
                latent, stage = torch.nn.functional.pad(latent, (0, longest - side, 0, longest - side)), 2
            samples.append(Sample(stage, latent, text, torch.randn(384, generator=g), float(torch.rand((), generator=g) * 1000)))
    return samples


SHAPES = {"portrait": (40, 24), "square": (32, 32), "landscape": (24, 40)}  # full-resolution latent sides


def shaped_samples(mixed: bool, seed: int = 0) -> list[Sample]:
    """The standard batch's stages and counts (4 / 8 / 4) with its samples spread over three aspect ratios (mixed:
    portrait 40x24, square 32x32, landscape 24x40 latents, in turn) or all square: how a mixed-shape batch costs
    against a square one. Text 24 tokens each, so only the shapes differ."""
    g = torch.Generator().manual_seed(seed)
    samples, n = [], 0
    for stage, _, count in STANDARD_STAGES:
        d = 2 ** (2 - stage)
        for _ in range(count):
            height, width = list(SHAPES.values())[n % 3] if mixed else SHAPES["square"]
            n += 1
            samples.append(Sample(stage, torch.randn(4, 1, height // d, width // d, generator=g),
                                  torch.randn(24, 384, generator=g), torch.randn(384, generator=g),
                                  float(torch.rand((), generator=g) * 1000)))
    return samples


def standard_batch(seed: int = 0, **kw) -> PackedBatch:
    """standard_samples(seed, **kw), packed."""
    return pack(standard_samples(seed, **kw), num_stages=3, patch_size=2, channels=4, text_dim=384, pooled_dim=384)


VARIANTS = {  # name -> (layout, attention, modulation); "reference" attention = a dense mask (pyraflow.bench.baselines)
    "grouped": ("packed", "grouped", "broadcast"),
    "reference": ("packed", "reference", "broadcast"),
    "grouped_per_token_modulation": ("packed", "grouped", "per-token"),
    "reference_columns": ("rows", "reference", "per-token"),
    "padded": ("padded", "grouped", "broadcast"),
    "per_stage": ("per_stage", "grouped", "broadcast"),
}
CUDA_VARIANTS = {  # the CUDA attention backends (flex has no backward on CPU; flash needs CUDA and flash-attn)
    "flex": ("packed", "flex", "broadcast"),
    "flash": ("packed", "flash", "broadcast"),
}
BACKEND_VARIANTS = ("grouped", "reference", "grouped_per_token_modulation", "flex", "flash")
THROUGHPUT_VARIANTS = {"pyraflow": "grouped", "reference_columns": "reference_columns", "padded": "padded",
                       "per_stage": "per_stage"}
VISUAL_TOKENS = sum(count * (side // 2) ** 2 for _, side, count in STANDARD_STAGES)  # 1,600 real visual tokens
SCALING_VARIANTS = {"pyraflow": "grouped", "reference_columns": "reference_columns", "per_stage": "per_stage"}
# The reference's [1, 2, 1] columns: row i holds standard sample i (stage 0), 4+2i and 5+2i (stage 1), 12+i (stage 2).
ROWS = 4
ROW_ORDER = [k for i in range(ROWS) for k in (i, 4 + 2 * i, 5 + 2 * i, 12 + i)]


def variant_names(device: torch.device) -> list[str]:
    """The variants this device can time: every layout, plus flex (and flash, when installed) on CUDA."""
    from pyraflow.attention import flash_available

    names = list(VARIANTS)
    if device.type == "cuda":
        names += ["flex"] + (["flash"] if flash_available() else [])
    return names


def host_precisions(device: torch.device) -> tuple[tuple[str, ...], str]:
    """The precisions worth timing on this device, and why, from the CPU capability torch reports (never a timing):
    on a CPU below AVX-512 (torch's capability "AVX2" or lower) bf16 has no fast path and runs emulated, on one
    thread, so a bench of every variant in bf16 there takes far longer than it tells anything."""
    if device.type == "cuda":
        return ("fp32", "bf16"), "CUDA"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") or capability.startswith("SVE") or capability == "ZVECTOR":
        return ("fp32", "bf16"), f"CPU capability {capability}"
    return ("fp32",), f"CPU capability {capability}: no fast bf16 path (bf16 would run emulated), so fp32 only"


def variant_precisions(name: str, device: torch.device = torch.device("cpu")) -> tuple[str, ...]:
    if name == "flash":
        return ("bf16",)  # flash-attn computes in half precision only
    return host_precisions(device)[0]


class TrainStep:
    """Forward, MSE loss, backward and AdamW on the standard batch in one of the layouts:

    packed     pyraflow's: all 16 samples in one packed sequence.
    rows       the reference's: rows of [1, 2, 1] integer columns (one low, two mid, one high segment),
               text padded to a fixed 32 tokens, held in row order throughout (each row's [text; visual]
               concatenated in place, no gather), rows batched with one dense block-diagonal mask each.
    padded     every segment padded to the longest stage (32x32 latent, 32 text tokens), batched.
    per_stage  one forward/backward per stage (as a bucketed trainer would), one optimizer step.
    """

    def __init__(self, variant: str, precision: str, device: torch.device, seed: int = 0, scale: int = 1,
                 samples: list[Sample] | None = None, compiled: bool = False, **model_overrides):
        """samples: train on these, packed (layout ``packed``), instead of the standard batch. compiled: the blocks
        compiled (pyraflow.compilation)."""
        layout, backend, modulation = {**VARIANTS, **CUDA_VARIANTS}[variant]
        torch.manual_seed(seed)
        product = backend if backend in ("grouped", "flex", "flash") else "grouped"
        self.model = MultiStageMMDiT(standard_model_config(attention=product, **model_overrides)).to(device)
        if compiled:
            compile_blocks(self.model)
        self.optimizer = make_optimizer(list(self.model.parameters()), lr=1e-4, weight_decay=0.0)
        self.device, self.precision = device, precision
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if layout == "per_stage":
            samples = standard_samples(seed, scale=scale)
            batches = [pack([s for s in samples if s.stage == k], 3, 2, 4, 384, 384) for k in range(3)]
        elif layout == "rows":  # the reference holds its batch in rows: [low, mid, mid, high] x 4, in this order
            samples = standard_samples(seed, pad_text=True, scale=scale)
            batches = [pack([samples[k] for k in ROW_ORDER], 3, 2, 4, 384, 384, keep_order=True)]
        elif samples is not None:
            batches = [pack(samples, 3, 2, 4, 384, 384)]
        else:
            batches = [standard_batch(seed, all_at_longest=layout == "padded", scale=scale)]
        self.batches = [b.to(device) for b in batches]
        self.contexts = [self.model.prepare(b.layout, device, dtype) for b in self.batches]
        for context in self.contexts:
            if layout == "rows":
                context.attention = RowAttention(context.layout, ROWS, device)
            elif backend == "reference":
                context.attention = DenseMaskAttention(context.layout, False, device)
            if modulation == "per-token":
                per_token_modulation(context, device)
        self.targets = [torch.randn_like(b.visual) for b in self.batches]

    def losses(self):
        """One loss per forward pass (one for every layout but per_stage)."""
        for batch, context, target in zip(self.batches, self.contexts, self.targets):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self.model(batch, context)
            yield torch.nn.functional.mse_loss(out.float(), target)

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for loss in self.losses():
            loss.backward()
            total += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    @property
    def batch(self) -> PackedBatch:
        return self.batches[0]


class SavedBytes:
    """Counts the bytes of the tensors autograd saves for backward while active (unique storages, the
    model's parameters excluded)."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._keep, lambda t: t)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.saved.values())

    def __enter__(self) -> "SavedBytes":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def accounted_memory_mb(step: TrainStep) -> float:
    """Memory of one training step by accounting: parameters, their gradients and AdamW's two moments
    (4 x parameter bytes) plus every tensor autograd saves for backward (unique storages, parameters
    excluded; for per-stage steps the largest pass, since each backward frees its graph). That is what
    is held at the peak between forward and backward. Transient buffers (e.g. inside SDPA) are not
    counted, so this is a lower bound; it is exact and repeatable, unlike resident-set sizes, which on
    CPU mostly reflect the allocator."""
    largest = 0
    passes = step.losses()
    while True:
        with SavedBytes(step.model) as saved:
            loss = next(passes, None)  # the forward runs here, inside the hook
        if loss is None:
            break
        largest = max(largest, saved.total)
        loss.backward()
    step.optimizer.zero_grad(set_to_none=True)
    static = 4 * sum(p.numel() * p.element_size() for p in step.model.parameters())
    return (static + largest) / 2**20


def cuda_peak_memory_mb(step: TrainStep, steps: int = 3) -> float:
    """Measured on CUDA: the peak of allocated memory over a few steps, above what the model holds."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    return torch.cuda.max_memory_allocated() / 2**20


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def segment_flops(text: int, visual: int, config: ModelConfig) -> float:
    """Model FLOPs of one forward pass over one packed segment of ``text`` + ``visual`` tokens: the linear layers of
    both streams in every block (the last block's text stream has only its q/k/v projection: its output is never
    read), plus attention scores and values (4 * L^2 * width per block). Embeddings, adaLN modulation and the output
    layer are left out."""
    d = config.width
    per_token = linear_flops_per_token(config)
    qkv_only = 2 * 3 * d * d
    linear = (text + visual) * per_token * config.depth - text * (per_token - qkv_only)
    return linear + 4 * (text + visual) ** 2 * d * config.depth


def training_flops(batch: PackedBatch, config: ModelConfig) -> float:
    """Model FLOPs of one training step (forward x 3) over every segment of ``batch``."""
    layout = batch.layout
    return 3 * sum(segment_flops(t, v, config) for t, v in zip(layout.text_lengths, layout.visual_lengths))


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best observed GFLOP/s of a square matmul: the machine's practical peak for that precision."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
