"""Every transformer pyraflow trains, by ``model.arch``: its own multi-stage MMDiT (``mmdit``) and the two released
Pyramid Flow transformers (``flux``, ``mmdit-sd3``). All take one PackedBatch and return one tensor aligned with its
visual tokens, so the trainer, sampler and history cache work with any of them."""

from __future__ import annotations

from pathlib import Path

from pyraflow.archs.flux import PyramidFlux
from pyraflow.archs.sd3 import PyramidSD3
from pyraflow.config import ModelConfig
from pyraflow.model import WEIGHTS, MultiStageMMDiT, PackedTransformer, read_model_config

ARCHITECTURES: dict[str, type[PackedTransformer]] = {cls.arch: cls for cls in (MultiStageMMDiT, PyramidFlux, PyramidSD3)}


def model_class(config: ModelConfig) -> type[PackedTransformer]:
    return ARCHITECTURES[config.arch]


def build_model(config: ModelConfig) -> PackedTransformer:
    """A freshly initialised model of ``config.arch`` (build it under ``torch.device('meta')`` to count it)."""
    return model_class(config)(config)


def load_model(directory: str | Path, weights: str = WEIGHTS, **overrides) -> PackedTransformer:
    """A model written by save_pretrained (or a pyraflow checkpoint: ``weights='ema.safetensors'`` for its EMA),
    of whichever architecture its config.json names."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; point at a directory written by save_pretrained.")
    arch = {**read_model_config(config_path), **overrides}.get("arch", "mmdit")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{config_path}: model.arch={arch!r} is unknown; use one of {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[arch].from_pretrained(directory, weights, **overrides)
