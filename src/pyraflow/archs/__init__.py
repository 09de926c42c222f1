"""Every transformer pyraflow trains, by ``model.arch``: its own multi-stage MMDiT (``mmdit``) and the two released
Pyramid Flow transformers (``flux``, ``mmdit-sd3``). All take one PackedBatch and return one tensor aligned with its
visual tokens, so the trainer, sampler and history cache work with any of them.

Models are obtained here only: built fresh (``build_model``), read from a model directory, a checkpoint or a released
folder (``load_model``; weights copied tensor by tensor into a built model, ``load_weights_into``), and the model a
run trains or samples (``training_model``, ``trained_model``: train.init_from's weights, LoRA adapters on top).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from pyraflow.archs.flux import PyramidFlux
from pyraflow.archs.sd3 import PyramidSD3
from pyraflow.config import Config, ModelConfig
from pyraflow.interop import is_reference_folder, model_config_from_reference
from pyraflow.lora import ADAPTER, add_adapters
from pyraflow.archs.base import PackedTransformer
from pyraflow.archs.mmdit import MultiStageMMDiT
from pyraflow.weights import (CONFIG, MODEL, REFERENCE, StoredTensors, load_tensors, read_json, read_model_config, read_tensors,
                              weight_files)

ARCHITECTURES: dict[str, type[PackedTransformer]] = {cls.arch: cls for cls in (MultiStageMMDiT, PyramidFlux, PyramidSD3)}
RUNTIME_FIELDS = ("attention", "checkpoint_fraction")  # how a model runs, not what it computes


def model_class(config: ModelConfig) -> type[PackedTransformer]:
    return ARCHITECTURES[config.arch]


def build_model(config: ModelConfig) -> PackedTransformer:
    """A freshly initialised model of ``config.arch`` (build it under ``torch.device('meta')`` to count it)."""
    return model_class(config)(config)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory; a sharded run allocates and fills
    each rank's part later), their buffers as usual (computed from the config: position tables, channel orders)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, parameter) -> None:
        register(module, name, parameter)
        if parameter is not None:
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def architecture(config: ModelConfig) -> dict:
    """What a ModelConfig computes: its fields less the runtime ones, defaults resolved (RoPE axes)."""
    fields = {k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS}
    return {**fields, "rope_axes": config.axes()}


def stored_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a released folder or of a pyraflow model directory / checkpoint."""
    path = Path(path)
    if is_reference_folder(path):
        return model_config_from_reference(read_json(path / CONFIG), str(path / CONFIG))
    config = read_model_config(path / CONFIG)
    if config.get("arch", "mmdit") not in ARCHITECTURES:
        raise ValueError(f"{path / CONFIG}: model.arch={config['arch']!r} is unknown; use one of {', '.join(ARCHITECTURES)}.")
    return ModelConfig(**config)


def stored_weights(path: str | Path, weights: str = MODEL,
                   dtype: torch.dtype | None = None) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(ModelConfig, iterator of (name, tensor)) of a released folder or a pyraflow model directory / checkpoint,
    the tensors read one at a time."""
    config = stored_config(path)
    files = weight_files(path, REFERENCE if is_reference_folder(path) else weights)
    return config, read_tensors(files, dtype)


def check_keys(config: ModelConfig, names: set[str], where: str) -> None:
    """The tensor names must be exactly those of ``config``'s architecture."""
    with torch.device("meta"):
        expected = set(build_model(config).state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(f"{where} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
                         f" ({len(missing)} / {len(unexpected)} in all).")


def check_architecture(config: ModelConfig, stored: ModelConfig, path: str | Path) -> None:
    """Weights stored for ``stored`` fit a model of ``config`` (runtime fields such as the attention backend aside)."""
    ours, theirs = architecture(config), architecture(stored)
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ValueError(f"the weights at {path} are of another architecture than model: ({'; '.join(differ)}); set "
                         "the model section to theirs (the fine-tuning presets carry the released shapes).")


def stored_tensors(path: str | Path, config: ModelConfig, weights: str = MODEL) -> StoredTensors:
    """The tensors stored at ``path`` (a released folder, a pyraflow model directory or checkpoint), checked to be of
    ``config``'s architecture, to read by name or by rows (a sharded run reads only its own rows)."""
    check_architecture(config, stored_config(path), path)
    return StoredTensors(weight_files(path, REFERENCE if is_reference_folder(path) else weights))


def load_weights_into(model: PackedTransformer, path: str | Path, weights: str = MODEL) -> None:
    """Copy the weights stored at ``path`` into ``model`` tensor by tensor (no second copy of the model in memory);
    the stored architecture must be the model's (runtime fields such as the attention backend may differ)."""
    config, tensors = stored_weights(path, weights)
    check_architecture(model.config, config, path)
    state = model.state_dict()
    seen = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in state or state[name].shape != tensor.shape:
                raise ValueError(f"{path}: tensor {name} {tuple(tensor.shape)} does not fit the model "
                                 f"({tuple(state[name].shape) if name in state else 'no such tensor'}).")
            state[name].copy_(tensor)
            seen.add(name)
    missing = sorted(set(state) - seen)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}; the folder is incomplete.")


def load_model(path: str | Path, weights: str = MODEL, **overrides) -> PackedTransformer:
    """The model (fp32) of a pyraflow model directory or checkpoint (``weights``: ema.safetensors for a checkpoint's
    EMA) or of a released folder, read in place, of whichever architecture its config.json names; ``overrides``
    change runtime fields (e.g. ``attention='flex'``)."""
    config = stored_config(path)
    if not is_reference_folder(path):
        return ARCHITECTURES[config.arch].from_pretrained(path, weights, **overrides)
    model = build_model(ModelConfig(**{**asdict(config), **overrides}))
    load_weights_into(model, path)
    return model


def training_model(config: Config, load_base: bool) -> PackedTransformer:
    """The model a run trains, on the CPU: a fresh ``model.arch``, or train.init_from's weights (``load_base``: the
    start of a run, or any LoRA run, whose checkpoints lack the base), with adapters where train.lora asks."""
    model = build_model(config.model)
    tc = config.train
    if tc.init_from and (load_base or tc.lora.rank):
        load_weights_into(model, tc.init_from)
    if tc.lora.rank:
        add_adapters(model, tc.lora)
    return model


def trained_model(directory: str | Path, config: Config, weights: str = MODEL) -> PackedTransformer:
    """The model of a checkpoint (``weights``: model.safetensors or ema.safetensors): for a LoRA run its base
    (train.init_from) with the checkpoint's adapters."""
    if not config.train.lora.rank:
        return load_model(directory, weights)
    model = training_model(config, load_base=True)
    state = load_tensors(Path(directory) / weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    adapters = {name for name in model.state_dict() if ADAPTER in name}
    if unexpected or adapters - set(state):
        raise ValueError(f"{Path(directory) / weights} does not hold this run's adapters (missing "
                         f"{sorted(adapters - set(state))[:3]}, unexpected {unexpected[:3]}); the checkpoint is inconsistent.")
    return model
