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
    noise = torch.randn((len(text), *latent_shape), generator=generator)
    return denoise_cascade(model, schedule, noise, text, null, steps, guidance, generator, device)


def denoise_cascade(
    model: MultiStageMMDiT,
    schedule: PyramidSchedule,
    noise: torch.Tensor,
    text: TextEmbedding,
    null: TextEmbedding,
    steps: list[int],
    guidance: float,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    history=None,
    unit: int | None = None,
    first_frame: int = 0,
    use_cache: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Run one latent (per caption) through every stage: noise (B, C, T, H, W) at full resolution -> latents.

    history(k, row) -> list of HistoryPart of caption ``row``, for a video unit predicted at stage k; with
    ``use_cache`` the text and history are run once per stage (MultiStageMMDiT.prefix_cache) instead of at
    every step.
    """
    model.eval()
    device = torch.device(device)
    n = len(text)
    x = schedule.noise_pyramid(noise)[0]
    guided = guidance != 1.0
    captions = [text.item(j) for j in range(n)] + ([null.item(0)] * n if guided else [])
    timings = []
    p = model.config.patch_size
    for k in range(schedule.num_stages):
        start = time.perf_counter()
        if k > 0:
            x = schedule.jump(x, k, generator)
        grid = schedule.sampling_grid(steps[k])
        parts = [history(k, j % n) if history is not None else [] for j in range(len(captions))]
        # Shapes stay fixed within a stage, so pack and prepare once; each step only swaps in the
        # current latents and timestep.
        cache = None
        if use_cache and parts[0]:
            prefix = [Sample(ps[-1].stage, ps[-1].latent, *c, ps[-1].timestep, ps[:-1], ps[-1].first_frame, ps[-1].unit)
                      for c, ps in zip(captions, parts)]
            cache = model.prefix_cache(pack(prefix, schedule.num_stages, p).to(device))
            parts = [[] for _ in captions]
        samples = [Sample(k, x[j % n], *c, 0.0, ps, first_frame, unit) for j, (c, ps) in enumerate(zip(captions, parts))]
        batch = pack(samples, schedule.num_stages, p).to(device)
        context = model.prepare(batch.layout, device, prefix=cache)
        rows = torch.tensor([i % n for i in batch.layout.order])  # packed segment -> row of x
        predicted = batch.layout.predicted_index().to(device)
        _, runs = torch.unique_consecutive(batch.layout.run_segment, return_counts=True)
        last_run = (runs.cumsum(0) - 1).to(device)  # the predicted latent's run in each segment
        for i in range(steps[k]):
            t = schedule.timestep(torch.tensor([k]), grid[i].float().reshape(1))[0]
            batch.visual[predicted] = patchify(x, p)[rows].flatten(0, 1).to(device)
            batch.timestep[last_run] = float(t)
            out = model(batch, context, prefix=cache)
            velocity = torch.stack(unpack(out.float().cpu(), batch.layout))
            if guided:
                v_cond, v_null = velocity[:n], velocity[n:]
                velocity = v_null + guidance * (v_cond - v_null)
            x = x + (grid[i + 1] - grid[i]).float() * velocity
        timings.append(time.perf_counter() - start)
    return x, timings


@torch.no_grad()
def sample_video(
    model: MultiStageMMDiT,
    schedule: PyramidSchedule,
    text: TextEmbedding,
    null: TextEmbedding,
    latent_shape: tuple[int, int, int, int],
    unit_frames: int,
    steps: list[int],
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    first_frame: torch.Tensor | None = None,
    use_cache: bool = True,
    max_history_units: int | None = None,
    history_noise: float = 0.0,
) -> tuple[torch.Tensor, list[float]]:
    """Autoregressive video: unit by unit, each through the whole stage cascade, conditioned on the
    compressed history of the units generated so far.

    latent_shape: (C, T, H, W) with T = 1 + U * unit_frames. first_frame: (B, C, 1, H, W) latents to start from
    (image-to-video) instead of generating unit 0. Returns (latents (B, C, T, H, W), seconds per unit).
    """
    from pyraflow.video import history_parts, unit_spans

    c, frames, h, w = latent_shape
    spans = unit_spans(frames, unit_frames)
    n = len(text)
    video = torch.zeros((n, c, frames, h, w))
    timings = []
    for u, (first, count) in enumerate(spans):
        start = time.perf_counter()
        if u == 0 and first_frame is not None:
            video[:, :, :1] = first_frame
            timings.append(0.0)
            continue
        noise = torch.randn((n, c, count, h, w), generator=generator)
        levels = schedule.data_pyramid(video)
        noise_levels = schedule.noise_pyramid(torch.randn(video.shape, generator=generator)) if history_noise else None

        def history(k: int, row: int):
            return history_parts([lv[row] for lv in levels], spans, u, k, max_history_units, history_noise,
                                 None if noise_levels is None else [nv[row] for nv in noise_levels],
                                 schedule.config.num_timesteps)

        video[:, :, first : first + count], _ = denoise_cascade(
            model, schedule, noise, text, null, steps, guidance, generator, device, history, u, first, use_cache)
        timings.append(time.perf_counter() - start)
    return video, timings


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
        """One sample per prompt -> (pixels (B, C, T, H, W) in [-1, 1], seconds per stage). Same seed, same pixels.

        Runs trained on video units generate their clip length autoregressively (seconds are then per unit).
        """
        if self.config.video_units():
            return self.video(prompts, self.config.data.frames, seed, steps=steps, guidance=guidance)
        sc = self.config.sample
        text = self.text_encoder.encode(list(prompts))
        generator = torch.Generator().manual_seed(seed)
        latents, timings = sample_pyramid(self.model, self.schedule, text, self.null, self.config.latent_shape(),
                                          steps or sc.steps_per_stage(self.schedule.num_stages),
                                          sc.guidance if guidance is None else guidance, generator)
        return self.latent_space.decode(latents).clamp(-1, 1), timings

    def max_frames(self) -> int:
        return self.config.video.max_frames or self.config.data.frames

    def video(self, prompts: list[str], frames: int, seed: int = 0, image: torch.Tensor | None = None,
              steps: list[int] | None = None, guidance: float | None = None, allow_longer: bool = False,
              use_cache: bool | None = None) -> tuple[torch.Tensor, list[float]]:
        """``frames`` frames per prompt, unit by unit -> (pixels (B, C, frames, H, W) in [-1, 1], seconds per unit).

        image: (C, H, W) pixels in [-1, 1] used as the first frame of every video (image-to-video).
        """
        cfg, vc = self.config, self.config.video
        c, trained, h, w = cfg.latent_shape()
        if vc.unit_frames is None:
            if frames != trained or image is not None:
                raise ValueError(
                    f"this run was trained on whole {trained}-frame samples (video.unit_frames unset), so it makes exactly "
                    f"{trained} frames and cannot start from an image; train with video.unit_frames for --frames/--image."
                )
            return self.generate(prompts, seed, steps, guidance)
        if frames > self.max_frames() and not allow_longer:
            raise ValueError(
                f"--frames {frames} is longer than this run's limit of {self.max_frames()} frames (its training clips); "
                "ask for fewer, or add --allow-longer to go on with the history limited to the trained units."
            )
        if image is not None:
            size = cfg.data.image_size
            if tuple(image.shape) != (cfg.data.channels, size, size):
                raise ValueError(
                    f"--image has shape {tuple(image.shape)} (channels, height, width) but this run makes "
                    f"{cfg.data.channels}x{size}x{size} frames; give a {size}x{size} image."
                )
        units = -(-(frames - 1) // vc.unit_frames)  # units after the first frame, rounded up
        total = 1 + units * vc.unit_frames
        history = vc.max_history_units
        if history is None and total > trained:
            history = (trained - 1) // vc.unit_frames  # never condition on more units than training showed
        sc = self.config.sample
        text = self.text_encoder.encode(list(prompts))
        generator = torch.Generator().manual_seed(seed)
        first = None
        if image is not None:
            first = self.latent_space.encode(image[None, :, None]).expand(len(prompts), -1, -1, -1, -1)
        latents, timings = sample_video(
            self.model, self.schedule, text, self.null, (c, total, h, w), vc.unit_frames,
            steps or sc.steps_per_stage(self.schedule.num_stages), sc.guidance if guidance is None else guidance,
            generator, first_frame=first, use_cache=vc.cache if use_cache is None else use_cache,
            max_history_units=history, history_noise=vc.sample_history_noise)
        pixels = self.latent_space.decode(latents[:, :, :frames]).clamp(-1, 1)
        if image is not None:
            pixels[:, :, 0] = image  # the given frame exactly, not its round trip through the latent space
        return pixels, timings

    def grid(self, prompts: list[str], per_prompt: int, path: Path, seed: int | None = None,
             steps: list[int] | None = None, guidance: float | None = None) -> list[float]:
        """``per_prompt`` samples for each prompt, one row per prompt, saved as one PNG (videos: a contact
        sheet PNG and a GIF beside it)."""
        seed = self.config.sample.seed if seed is None else seed
        pixels, timings = self.generate([p for p in prompts for _ in range(per_prompt)], seed, steps, guidance)
        path = Path(path)
        if pixels.shape[2] > 1:
            write_video(pixels, path.with_suffix(".gif"), rows=len(prompts))
            write_image(contact_sheet(pixels), path)
        else:
            write_image(to_grid_image(pixels[:, :, 0], rows=len(prompts)), path)
        return timings


def write_image(image, path: Path) -> None:
    """Save a Pillow image atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    image.save(tmp)
    tmp.replace(path)


def contact_sheet(videos: torch.Tensor):
    """(B, C, T, H, W) in [-1, 1] -> a Pillow image: one row per video, its frames left to right."""
    b, c, t, h, w = videos.shape
    return to_grid_image(videos.transpose(1, 2).reshape(b * t, c, h, w), rows=b)


VIDEO_SUFFIXES = (".gif", ".mp4")


def write_video(videos: torch.Tensor, path: Path, rows: int = 1, fps: int = 8, scale: int = 4) -> None:
    """(B, C, T, H, W) in [-1, 1] -> a GIF or MP4 whose frame t is the grid of every video's frame t.

    Small frames are enlarged ``scale`` times (nearest) so a 32-pixel clip is watchable.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: video output must end in {' or '.join(VIDEO_SUFFIXES)}.")
    frames = [to_grid_image(videos[:, :, i], rows) for i in range(videos.shape[2])]
    frames = [f.resize((f.width * scale, f.height * scale), resample=0) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + suffix)
    if suffix == ".gif":
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
    else:
        import av
        import numpy as np

        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
            stream.width, stream.height = frames[0].width + frames[0].width % 2, frames[0].height + frames[0].height % 2
            stream.pix_fmt = "yuv420p"
            for f in frames:
                rgb = np.zeros((stream.height, stream.width, 3), dtype=np.uint8)
                rgb[: f.height, : f.width] = np.asarray(f.convert("RGB"))
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    tmp.replace(path)


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
