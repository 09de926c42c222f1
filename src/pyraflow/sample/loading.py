"""``load_pipeline``: a run, a checkpoint or a released Pyramid Flow folder -> a ready Pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from pyraflow.archs import trained_model
from pyraflow.sample.pipeline import Pipeline, default_device
from pyraflow.sample.released import is_released_root, load_released
from pyraflow.schedule import PyramidSchedule


def load_pipeline(checkpoint: str | Path, device: torch.device | str | None = None, use_ema: bool = True,
                  video: bool = False, transformer: str | Path | None = None, precision: str = "fp32",
                  offload: bool = False, **released) -> Pipeline:
    """A run directory or checkpoint, or a released Pyramid Flow folder (pyraflow.sample.released; ``video`` picks
    its video transformer, ``transformer`` a fine-tune to sample in place of it, ``released`` its decode options)
    -> a ready Pipeline on ``device`` (default: CUDA when present), with clear errors for missing or corrupt files.
    ``precision`` and ``offload``: see Pipeline."""
    from pyraflow.config import load_config
    from pyraflow.latents import build_latent_space
    from pyraflow.text import load_null, load_text_encoder
    from pyraflow.checkpoint import SAMPLING, resolve_checkpoint
    from pyraflow.weights import CONFIG, EMA, MODEL, NULL_TEXT

    if is_released_root(checkpoint):
        return load_released(checkpoint, device=device, video=video, transformer=transformer, precision=precision,
                             offload=offload, **released)
    if transformer is not None:
        raise ValueError(f"--transformer replaces a released folder's transformer; {checkpoint} is not a released "
                         "folder (a run samples with its own model).")
    if any(value is not None for value in released.values()):
        raise ValueError(f"--variant, --decode-window and --decode-tile are for a released folder (its transformers and "
                         f"causal VAE); {checkpoint} is not a released folder.")
    device = torch.device(device) if device is not None else default_device()
    weights = EMA if use_ema else MODEL
    path = resolve_checkpoint(checkpoint, SAMPLING + (weights,))
    config = load_config(path / "run.yaml")
    model = trained_model(path, config, weights)
    if model.config != config.model:
        raise ValueError(f"{path / CONFIG} does not match the model section of {path / 'run.yaml'}; "
                         "the checkpoint is inconsistent.")
    text_encoder = load_text_encoder(config.text, widths=(config.model.text_dim, config.model.pooled_dim))
    negative = config.sample.negative_prompt
    null = load_null(path / NULL_TEXT) if negative is None else text_encoder.encode([negative])
    home = torch.device("cpu") if offload else device
    return Pipeline(config, model.to(home), PyramidSchedule(config.schedule), text_encoder,
                    build_latent_space(config.latent, home), null, precision=precision, offload=offload, device=device)
