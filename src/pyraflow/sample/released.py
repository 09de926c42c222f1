"""A released Pyramid Flow folder (rain1011/pyramid-flow-miniflux or -sd3, or a copy of its layout with a fine-tuned
transformer in place) as a pyraflow Pipeline, sampling as the reference's ``generate`` does.

    pipe = load_released("/models/pyramid-flow-miniflux")                       # diffusion_transformer_image
    pixels, _ = pipe.generate(["a cat sitting on a chair"], size=(1024, 1024))
    pipe = load_released("/models/pyramid-flow-miniflux", video=True, frames=16)  # diffusion_transformer_384p
    video, _ = pipe.generate(["a red fox running through the snow"], size=(384, 640))   # 121 frames

What the reference does is set in the Config built here, so the sampler itself is pyraflow's own: its schedule
preset (``pyramid-flow``: the reference's sigma table, stage windows and per-stage grid linspace(1, 1/1000, n)
then 0), three stages with gamma 1/3, its prompt suffix and negative prompt as guidance's unconditional branch,
its guidance for the first frame and video guidance for the units after it (one latent frame each, conditioned on
every earlier one), the released text encoders (CLIP + T5) and the causal video VAE with the latent normalisation
of the model's kind. Noise is pyraflow's (one full-resolution Gaussian, block noise drawn for all blocks at once):
same seed, same result, but not the reference's pixels from the reference's seed (its block noise comes from
torch's global RNG one 2x2 block at a time).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyraflow.config import (Config, DataConfig, LatentConfig, ModelConfig, SampleConfig, ScheduleConfig, TextConfig,
                             VideoConfig)
from pyraflow.weights import CONFIG, read_json

PROMPT_SUFFIX = ", hyper quality, Ultra HD, 8K"
NEGATIVE_PROMPT = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, "
                   "extra limbs, extra digits, misplaced objects, mutated anatomy, monochrome, horror")
VAE = "causal_video_vae"
IMAGE_VARIANT = "diffusion_transformer_image"
VIDEO_VARIANTS = ("diffusion_transformer_384p", "diffusion_transformer_768p")
MAX_TEXT_TOKENS = 128  # the reference tokenises T5 to 128
IMAGE_SIDE = 1024  # the reference's text-to-image default
VIDEO_SIDE = 384  # the 384p transformer's short side (its clips are 640 x 384)
MAX_LATENT_FRAMES = 31  # 241 video frames: the reference's 10 s at 24 fps


def is_released_root(path: str | Path) -> bool:
    """A folder with the released layout: causal_video_vae/ and at least one diffusion_transformer_*/."""
    path = Path(path)
    return (path / VAE).is_dir() and any((path / v).is_dir() for v in (IMAGE_VARIANT, *VIDEO_VARIANTS))


def released_variant(root: str | Path, variant: str | None = None, video: bool = False) -> str:
    """``variant`` (a diffusion_transformer_* subfolder) checked against ``root``; default: for pictures the
    text-to-image transformer where the folder has it, for videos the first video transformer."""
    root = Path(root)
    if not is_released_root(root):
        raise ValueError(f"{root} is not a released Pyramid Flow folder: it needs {VAE}/ and a diffusion_transformer_*/ "
                         "subfolder (download rain1011/pyramid-flow-miniflux or -sd3 whole).")
    variants = [v for v in (IMAGE_VARIANT, *VIDEO_VARIANTS) if (root / v / CONFIG).is_file()]
    if variant is None:
        videos = [v for v in variants if v != IMAGE_VARIANT]
        if video and not videos:
            raise ValueError(f"{root} has no video transformer (diffusion_transformer_384p/ or _768p/) to sample videos.")
        return videos[0] if video else variants[0]
    if variant not in variants:
        raise ValueError(f"{root} has no {variant}/ transformer; it has {', '.join(variants)}.")
    return variant


def released_config(root: str | Path, variant: str | None = None, frames: int | None = None, **sample) -> Config:
    """The Config that samples ``root``'s ``variant`` as the reference does; ``sample`` overrides SampleConfig
    fields (steps, guidance, video_guidance, seed, ...). A video transformer makes ``frames`` latent frames (default
    16: 121 video frames, 5 s at 24 fps), the first as an image, then one latent frame per unit conditioned on all
    earlier ones; the image transformer makes pictures."""
    from pyraflow.interop import model_config_from_reference
    from pyraflow.interop.vae import FIRST_FRAME, LATER_FRAMES

    root = Path(root)
    variant = released_variant(root, variant)
    reference = root / variant / CONFIG
    model = model_config_from_reference(read_json(reference), str(reference))
    (shift, scale), (video_shift, video_scale) = FIRST_FRAME[model.arch], LATER_FRAMES
    if variant == IMAGE_VARIANT:
        if frames not in (None, 1):
            raise ValueError(f"{variant} makes pictures (1 frame); sample videos with a diffusion_transformer_384p/ "
                             "or _768p/ transformer.")
        video, defaults = VideoConfig(), {"guidance": 9.0}
        frames = 1
    else:
        video = VideoConfig(unit_frames=1, max_frames=MAX_LATENT_FRAMES, max_history_units=MAX_LATENT_FRAMES, cache=False)
        defaults = {"guidance": 7.0, "video_guidance": 5.0}
        frames = frames or 16
    settings = {"steps": [20, 20, 20], **defaults, "prompt_suffix": PROMPT_SUFFIX, "negative_prompt": NEGATIVE_PROMPT,
                **sample}
    return Config(
        schedule=ScheduleConfig(preset="pyramid-flow", stages=3, gamma=1 / 3, density="uniform"),
        data=DataConfig(channels=3, image_size=IMAGE_SIDE if variant == IMAGE_VARIANT else VIDEO_SIDE, frames=frames),
        video=video,
        text=TextConfig(encoder="pyramid-flow", path=str(root), max_tokens=MAX_TEXT_TOKENS),
        latent=LatentConfig(kind="pyramid-flow-vae", path=str(root / VAE), scale=scale, shift=shift, video_scale=video_scale,
                            video_shift=video_shift),
        model=model,
        sample=SampleConfig(**settings),
    )


def load_transformer(source: str | Path, expected: ModelConfig):
    """A fine-tune of a released transformer: a pyraflow run or checkpoint (its EMA weights; a LoRA run's adapters
    on its train.init_from base) or a model directory, checked to fit in place of ``expected``."""
    from pyraflow.archs import check_architecture, load_model, trained_model
    from pyraflow.config import load_config
    from pyraflow.convert import source_weights

    directory, weights = source_weights(source)
    if (directory / "run.yaml").is_file():
        model = trained_model(directory, load_config(directory / "run.yaml"), weights)
    else:
        model = load_model(directory, weights)
    check_architecture(expected, model.config, source)
    return model


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_released(root: str | Path, variant: str | None = None, device: torch.device | str | None = None,
                  frames: int | None = None, video: bool = False, transformer: str | Path | None = None,
                  precision: str = "fp32", offload: bool = False, decode_window: int | None = None,
                  decode_tile: int | None = 512, **sample):
    """A released folder -> a Pipeline on ``device`` (default: CUDA when present) sampling its ``variant``
    (``released_config`` has the rest); ``transformer``: a fine-tune (run, checkpoint or model directory, see
    ``load_transformer``) sampled in place of the folder's own, with the folder's encoders and VAE.

    Memory on one GPU: ``precision="bf16"`` loads the transformer, the text encoders and the VAE in bf16 (as the
    reference runs them); ``offload`` keeps them on the CPU, each moved to the device only while it runs;
    ``decode_window`` latent frames decoded at a time (default 2, the reference's; 1 is its save_memory) and
    ``decode_tile`` pixels per spatial tile (512, the reference's; 256 is its save_memory; None: whole frames)."""
    from pyraflow.archs import load_model
    from pyraflow.latents import build_latent_space
    from pyraflow.sample.pipeline import Pipeline, default_device
    from pyraflow.schedule import PyramidSchedule
    from pyraflow.text import load_text_encoder

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use fp32 or bf16.")
    if decode_window is not None and decode_window < 1:
        raise ValueError(f"decode window {decode_window}: give at least 1 latent frame.")
    variant = released_variant(root, variant, video)
    config = released_config(root, variant, frames, **sample)
    device = torch.device(device) if device is not None else default_device()
    home = torch.device("cpu") if offload else device  # where the parts wait between their turns
    model = load_model(Path(root) / variant) if transformer is None else load_transformer(transformer, config.model)
    dtype = PRECISIONS[precision]
    text_encoder = load_text_encoder(config.text, home, dtype=dtype)
    latent_space = build_latent_space(config.latent, home, dtype)
    latent_space.decode_window = decode_window or latent_space.DECODE_WINDOW
    latent_space.tile = decode_tile
    return Pipeline(config, model.to(home), PyramidSchedule(config.schedule), text_encoder, latent_space, None,
                    precision=precision, offload=offload, device=device)
