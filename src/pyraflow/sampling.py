"""Pyramidal sampling: Euler steps through each stage, a renoising jump between stages, and
classifier-free guidance. The sampler owns the loop; the model is only a velocity function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyraflow.model import MultiStageMMDiT
from pyraflow.packing import Sample, pack, patchify, unpack
from pyraflow.schedule import PyramidSchedule
from pyraflow.text import TextEmbedding


@dataclass
class SampleConfig:
    """How sample grids are drawn (during training and by ``pyraflow sample``)."""

    steps: list[int] | int = 10
    """Euler steps per stage: one number for every stage, or one per stage."""
    guidance: float = 3.0
    """Classifier-free guidance scale (1 = no guidance)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts for the grids written during training; empty means the dataset's own (the ten digits for mnist)."""
    per_prompt: int = 8
    """Images per prompt in those grids."""
    seed: int = 0

    def __post_init__(self) -> None:
        steps = [self.steps] if isinstance(self.steps, int) else list(self.steps)
        if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"sample.steps={self.steps!r} must be a positive integer or a list of them (one per stage).")
        if self.guidance < 0:
            raise ValueError(f"sample.guidance={self.guidance} must be >= 0.")
        if self.per_prompt < 1:
            raise ValueError(f"sample.per_prompt={self.per_prompt} must be >= 1.")

    def steps_per_stage(self, num_stages: int) -> list[int]:
        steps = [self.steps] * num_stages if isinstance(self.steps, int) else list(self.steps)
        if len(steps) != num_stages:
            raise ValueError(f"sample.steps has {len(steps)} entries for {num_stages} stages; give one per stage.")
        return steps


@torch.no_grad()
def sample_pyramid(
    model: MultiStageMMDiT,
    schedule: PyramidSchedule,
    text: TextEmbedding,
    null: TextEmbedding,
    latent_shape: tuple[int, int, int, int],
    steps: list[int],
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[float]]:
    """Generate one latent per caption in ``text``.

    latent_shape: (C, T, H, W) at full resolution. Returns (latents (B, C, T, H, W), seconds per stage).
    Stage 0 starts from the coarsest level of one full-resolution Gaussian; each stage integrates its
    local coordinate r from 1 to 0 (x <- x + (r_next - r) v); between stages ``schedule.jump`` upsamples
    and renoises with block noise. Guidance runs the conditional and null branches in one packed pass.
    """
    model.eval()
    device = torch.device(device)
    n = len(text)
    noise = torch.randn((n, *latent_shape), generator=generator)
    x = schedule.noise_pyramid(noise)[0]
    guided = guidance != 1.0
    null_tokens, null_pooled = null.item(0)
    timings = []
    p = model.config.patch_size
    for k in range(schedule.num_stages):
        start = time.perf_counter()
        if k > 0:
            x = schedule.jump(x, k, generator)
        grid = schedule.sampling_grid(steps[k])
        # Shapes stay fixed within a stage, so pack and prepare once; each step only swaps in the
        # current latents and timestep.
        samples = [Sample(k, x[j], *text.item(j), 0.0) for j in range(n)]
        if guided:
            samples += [Sample(k, x[j], null_tokens, null_pooled, 0.0) for j in range(n)]
        batch = pack(samples, schedule.num_stages, p).to(device)
        context = model.prepare(batch.layout, device)
        rows = torch.tensor([i % n for i in batch.layout.order])  # packed segment -> row of x
        for i in range(steps[k]):
            t = schedule.timestep(torch.tensor([k]), grid[i].float().reshape(1))[0]
            batch.visual = patchify(x, p)[rows].flatten(0, 1).to(device)
            batch.timestep = torch.full_like(batch.timestep, float(t))
            velocity = torch.stack(unpack(model(batch, context).float().cpu(), batch.layout))
            if guided:
                v_cond, v_null = velocity[:n], velocity[n:]
                velocity = v_null + guidance * (v_cond - v_null)
            x = x + (grid[i + 1] - grid[i]).float() * velocity
        timings.append(time.perf_counter() - start)
    return x, timings


def to_grid_image(pixels: torch.Tensor, rows: int):
    """(B, C, H, W) in [-1, 1] -> a Pillow image with ``rows`` rows."""
    from PIL import Image

    b, c, h, w = pixels.shape
    cols = (b + rows - 1) // rows
    canvas = torch.full((c, rows * (h + 2) + 2, cols * (w + 2) + 2), -1.0)
    for i in range(b):
        r, q = divmod(i, cols)
        canvas[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = pixels[i]
    array = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)


class Pipeline:
    """Everything sampling needs from a run: config, (EMA) model, schedule, text encoder, latent space, null text."""

    def __init__(self, config, model: MultiStageMMDiT, schedule: PyramidSchedule, text_encoder, latent_space,
                 null: TextEmbedding):
        self.config, self.model, self.schedule = config, model.eval(), schedule
        self.text_encoder, self.latent_space, self.null = text_encoder, latent_space, null

    def generate(self, prompts: list[str], seed: int = 0, steps: list[int] | None = None,
                 guidance: float | None = None) -> tuple[torch.Tensor, list[float]]:
        """One sample per prompt -> (pixels (B, C, T, H, W) in [-1, 1], seconds per stage). Same seed, same pixels."""
        sc = self.config.sample
        text = self.text_encoder.encode(list(prompts))
        generator = torch.Generator().manual_seed(seed)
        latents, timings = sample_pyramid(self.model, self.schedule, text, self.null, self.config.latent_shape(),
                                          steps or sc.steps_per_stage(self.schedule.num_stages),
                                          sc.guidance if guidance is None else guidance, generator)
        return self.latent_space.decode(latents).clamp(-1, 1), timings

    def grid(self, prompts: list[str], per_prompt: int, path: Path, seed: int | None = None,
             steps: list[int] | None = None, guidance: float | None = None) -> list[float]:
        """``per_prompt`` images for each prompt, one row per prompt, saved as one PNG."""
        seed = self.config.sample.seed if seed is None else seed
        pixels, timings = self.generate([p for p in prompts for _ in range(per_prompt)], seed, steps, guidance)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        to_grid_image(pixels[:, :, 0], rows=len(prompts)).save(tmp)
        tmp.replace(path)
        return timings


def load_pipeline(checkpoint: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> Pipeline:
    """A run directory or checkpoint -> a ready Pipeline, with clear errors for missing or corrupt files."""
    from dataclasses import fields

    from pyraflow.checkpoint import load_tensors, read_model_config, resolve_checkpoint
    from pyraflow.config import load_config
    from pyraflow.latents import build_latent_space
    from pyraflow.model import ModelConfig
    from pyraflow.text import load_null, load_text_encoder

    path = resolve_checkpoint(checkpoint)
    config = load_config(path / "run.yaml")
    raw = read_model_config(path)
    known = {f.name for f in fields(ModelConfig)}
    if set(raw) - known or ModelConfig(**{k: v for k, v in raw.items() if k in known}) != config.model:
        raise ValueError(f"{path / 'config.json'} does not match the model section of {path / 'run.yaml'}; the checkpoint is inconsistent.")
    model = MultiStageMMDiT(config.model)
    state = load_tensors(path / ("ema.safetensors" if use_ema else "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    text_encoder = load_text_encoder(config.text)
    return Pipeline(config, model.to(device), PyramidSchedule(config.schedule), text_encoder,
                    build_latent_space(config.latent, device), load_null(path / "null_text.safetensors"))
