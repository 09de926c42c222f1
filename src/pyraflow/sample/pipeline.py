"""A trained run (or a released folder), ready to sample: ``load_pipeline(RUN)`` (pyraflow.sample.loading) ->
``Pipeline.generate / video / grid``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pyraflow.compilation import compile_blocks, resolve_compile
from pyraflow.config import Config
from pyraflow.media import write_grid
from pyraflow.archs.base import PackedTransformer
from pyraflow.sample.sampler import model_device, sample_pyramid, sample_video
from pyraflow.schedule import PyramidSchedule
from pyraflow.text import TextEmbedding


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    """Everything sampling needs from a run: config, (EMA) model, schedule, text encoder, latent space, null text.

    Sampling runs on ``device`` (default: the model's); pixels come back on the CPU. ``precision="bf16"`` keeps the
    transformer's weights in bf16 and runs it under autocast (half the memory of fp32 weights). ``offload=True``
    keeps the text encoders, the transformer and the VAE on the CPU and moves each to the device only while it runs,
    so the device holds one of them at a time (what the reference's ``cpu_offloading`` does). ``null``: guidance's
    unconditional text; None encodes sample.negative_prompt (or the empty caption).
    """

    def __init__(self, config: Config, model: PackedTransformer, schedule: PyramidSchedule, text_encoder, latent_space,
                 null: TextEmbedding | None, precision: str = "fp32", offload: bool = False,
                 device: torch.device | str | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"sampling precision {precision!r}: use fp32 or bf16.")
        self.config, self.model, self.schedule = config, model.eval(), schedule
        self.text_encoder, self.latent_space = text_encoder, latent_space
        self.device = torch.device(device) if device is not None else model_device(model)
        self.precision, self.offload = precision, offload
        if precision == "bf16":
            model.to(torch.bfloat16)
        # guidance's unconditional caption: the run's empty one, or sample.negative_prompt
        self.null = self.encode_text([config.sample.negative_prompt or ""]) if null is None else null
        if resolve_compile(config.sample.compile, self.device, "sample.compile"):
            compile_blocks(model)

    @contextlib.contextmanager
    def _on_device(self, component):
        """``component`` (a module, or a text encoder or latent space with ``to``) on the sampling device while the
        block runs; with offload it is moved there first and back to the CPU after."""
        move = self.offload and hasattr(component, "to")
        if move:
            component.to(self.device)
        try:
            yield
        finally:
            if move:
                component.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _running_model(self):
        """The transformer on the device, under bf16 autocast where precision is bf16."""
        with self._on_device(self.model), torch.autocast(self.device.type, torch.bfloat16,
                                                         enabled=self.precision == "bf16"):
            yield

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        with self._on_device(self.text_encoder):
            return self.text_encoder.encode(captions)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        return self.encode_text([p + self.config.sample.prompt_suffix for p in prompts])

    def _encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._on_device(self.latent_space):
            return self.latent_space.encode(pixels)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._on_device(self.latent_space):
            return self.latent_space.decode(latents.float()).clamp(-1, 1).cpu()

    def latent_shape(self, size: tuple[int, int] | None = None, frames: int | None = None) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents of a picture of ``size`` = (height, width) pixels (default: the run's square),
        refusing a size the pyramid cannot halve cleanly and naming the nearest one it can."""
        cfg = self.config
        c, t, h, w = cfg.latent_shape()
        if size is not None:
            height, width = size
            if (height, width) != cfg.valid_size(height, width):
                valid = cfg.valid_size(height, width)
                raise ValueError(
                    f"{height}x{width} pixels cannot be halved cleanly through {cfg.schedule.stages} stages with patch "
                    f"{cfg.model.patch_size}: height and width must be multiples of {cfg.bucket_multiple()}; the nearest "
                    f"size is {valid[0]}x{valid[1]} (--height {valid[0]} --width {valid[1]}).")
            downsample = cfg.latent.resolved_downsample()
            h, w = height // downsample, width // downsample
        return (c, frames or t, h, w)

    def generate(self, prompts: list[str], seed: int = 0, steps: list[int] | None = None,
                 guidance: float | None = None, solver: str | None = None, on_stage_end=None,
                 size: tuple[int, int] | None = None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
        """One sample per prompt -> (pixels (B, C, T, H, W) in [-1, 1], seconds per stage). Same seed, same pixels.

        size: (height, width) in pixels, any the pyramid can halve (default: the run's square size). Runs trained on
        video units generate their clip length autoregressively (seconds are then per unit).
        on_stage_end(k, latents): sees the latents at the end of each stage. noise: the full-resolution starting
        latents (B, C, T, h, w) instead of the seed's.
        """
        if self.config.video_units():
            return self.video(prompts, self.config.data.frames, seed, steps=steps, guidance=guidance, size=size,
                              on_stage_end=on_stage_end, noise=noise)
        sc = self.config.sample
        text = self._encode(prompts)
        with self._running_model():
            latents, timings = sample_pyramid(self.model, self.schedule, text, self.null, self.latent_shape(size),
                                              steps or sc.steps_per_stage(self.schedule.num_stages),
                                              sc.guidance if guidance is None else guidance, self._generator(seed),
                                              solver or sc.solver, on_stage_end, noise)
        return self._decode(latents), timings

    def max_frames(self) -> int:
        return self.config.video.max_frames or self.default_frames()

    def default_frames(self) -> int:
        """The clip length a video gets when none is asked for: the longest the run trained on."""
        return max(self.config.data.clip_lengths())

    def video(self, prompts: list[str], frames: int, seed: int = 0, image: torch.Tensor | None = None,
              steps: list[int] | None = None, guidance: float | None = None, allow_longer: bool = False,
              use_cache: bool | None = None, on_stage_end=None, size: tuple[int, int] | None = None,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
        """``frames`` frames per prompt, unit by unit -> (pixels (B, C, frames, H, W) in [-1, 1], seconds per unit).

        frames count the model's (latent) frames: through Pyramid Flow's causal VAE each after the first decodes to
        8 video frames. image: (C, H, W) pixels in [-1, 1] used as the first frame of every video (image-to-video);
        size: (height, width) pixels (default: the run's square size, or the image's); noise: the starting latents
        of the whole clip (B, C, T, h, w) instead of the seed's.
        """
        cfg, vc = self.config, self.config.video
        if size is None and image is not None and cfg.data.bucketed:
            size = tuple(image.shape[1:])
        c, _, h, w = self.latent_shape(size)
        trained = max(cfg.data.clip_lengths())
        if vc.unit_frames is None:
            if frames != trained or image is not None:
                raise ValueError(
                    f"this run was trained on whole {trained}-frame samples (video.unit_frames unset), so it makes exactly "
                    f"{trained} frames and cannot start from an image; train with video.unit_frames for --frames/--image."
                )
            return self.generate(prompts, seed, steps, guidance, size=size)
        if frames > self.max_frames() and not allow_longer:
            raise ValueError(
                f"--frames {frames} is longer than this run's limit of {self.max_frames()} frames (its training clips); "
                "ask for fewer, or add --allow-longer to go on with the history limited to the trained units."
            )
        if image is not None:
            downsample = cfg.latent.resolved_downsample()
            height, width = h * downsample, w * downsample
            if tuple(image.shape) != (cfg.data.channels, height, width):
                raise ValueError(
                    f"--image has shape {tuple(image.shape)} (channels, height, width) but these videos have "
                    f"{cfg.data.channels}x{height}x{width} frames; give a {height}x{width} image."
                )
        units = -(-(frames - 1) // vc.unit_frames)  # units after the first frame, rounded up
        total = 1 + units * vc.unit_frames
        history = vc.max_history_units
        if history is None and total > trained:
            history = (trained - 1) // vc.unit_frames  # never condition on more units than training showed
        sc = self.config.sample
        text = self._encode(prompts)
        first = None
        if image is not None:
            first = self._encode_latents(image[None, :, None]).expand(len(prompts), -1, -1, -1, -1)
        with self._running_model():
            latents, timings = sample_video(
                self.model, self.schedule, text, self.null, (c, total, h, w), vc.unit_frames,
                steps or sc.steps_per_stage(self.schedule.num_stages), sc.guidance if guidance is None else guidance,
                self._generator(seed), first_frame=first, use_cache=vc.cache if use_cache is None else use_cache,
                max_history_units=history, history_noise=vc.sample_history_noise, solver=sc.solver,
                on_stage_end=on_stage_end, video_guidance=sc.video_guidance if guidance is None else guidance,
                noise=noise)
        pixels = self._decode(latents[:, :, :frames])
        if image is not None:
            pixels[:, :, 0] = image  # the given frame exactly, not its round trip through the latent space
        return pixels, timings

    def grid(self, prompts: list[str], per_prompt: int, path: Path, seed: int | None = None,
             steps: list[int] | None = None, guidance: float | None = None,
             size: tuple[int, int] | None = None) -> list[float]:
        """``per_prompt`` samples for each prompt, one row per prompt, saved as one PNG (videos: a contact
        sheet PNG and a GIF beside it)."""
        seed = self.config.sample.seed if seed is None else seed
        pixels, timings = self.generate([p for p in prompts for _ in range(per_prompt)], seed, steps, guidance,
                                        size=size)
        write_grid(pixels, path, rows=len(prompts))
        return timings
