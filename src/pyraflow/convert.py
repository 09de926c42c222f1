"""Weights between formats, as library functions (``pyraflow convert`` calls them): a released Pyramid Flow folder
into a pyraflow model directory, a pyraflow model (a run, a checkpoint or a model directory) out to a folder the
reference's ``from_pretrained`` loads, and a LoRA run's adapters merged into its base.

Tensors stream one at a time (shards of at most ``shard_bytes`` written as they fill), so peak memory stays about
one model even for the released 2B transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from pyraflow.archs import check_keys, stored_config, trained_model
from pyraflow.checkpoint import resolve_checkpoint
from pyraflow.config import ModelConfig, load_config
from pyraflow.interop import model_config_from_reference, reference_config
from pyraflow.lora import ADAPTER, merge_adapters
from pyraflow.storage import write_json
from pyraflow.weights import CONFIG, EMA, MODEL, REFERENCE, read_json, read_tensors, save_model, tensor_names, weight_files, \
    write_model_config, write_weights

SHARD_BYTES = 10 * 2**30  # the reference's diffusers folders are sharded at 10 GB


def import_reference(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> ModelConfig:
    """A released transformer folder -> a pyraflow model directory (config.json + model.safetensors), which
    ``pyraflow.archs.load_model`` and ``train.init_from`` read. Tensors keep their dtype unless ``dtype`` is given."""
    folder, out = Path(folder), Path(out)
    config = model_config_from_reference(read_json(folder / CONFIG), str(folder / CONFIG))
    files = weight_files(folder, REFERENCE)
    check_keys(config, tensor_names(files), str(folder))
    write_weights(read_tensors(files, dtype), out, MODEL)
    write_model_config(out, config)
    return config


def source_weights(source: str | Path, raw: bool = False) -> tuple[Path, str]:
    """A run, a checkpoint or a model directory -> (directory, weights file): a run's latest checkpoint, its EMA
    weights unless ``raw`` (a model directory has only model.safetensors)."""
    source = Path(source)
    weights = MODEL if raw else EMA
    if (source / "checkpoints").is_dir() or (source / "run.yaml").is_file():
        return resolve_checkpoint(source, (CONFIG, "run.yaml", weights)), weights
    return source, weights if (source / weights).is_file() else MODEL


def export_reference(source: str | Path, out: str | Path, raw: bool = False, dtype: torch.dtype | None = None,
                     shard_bytes: int | None = SHARD_BYTES) -> dict:
    """A pyraflow run, checkpoint or model directory (its EMA weights unless ``raw``) -> a folder the reference's
    ``PyramidFluxTransformer / PyramidDiffusionMMDiT.from_pretrained`` loads; returns its config.json."""
    directory, weights = source_weights(source, raw)
    config = stored_config(directory)
    files = weight_files(directory, weights)
    names = tensor_names(files)
    if any(ADAPTER in name for name in names):
        raise ValueError(f"{directory / weights} holds LoRA adapters, not a whole model; export it with "
                         "pyraflow convert --to pyramid-flow RUN --merge-lora.")
    check_keys(config, names, str(directory / weights))
    return write_reference(config, read_tensors(files, dtype), out, shard_bytes)


def write_reference(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], out: str | Path,
                    shard_bytes: int | None = SHARD_BYTES) -> dict:
    """(name, tensor) pairs of ``config``'s architecture as a released folder: its config.json and weights."""
    reference = reference_config(config)
    write_weights(tensors, out, REFERENCE, shard_bytes)
    write_json(Path(out) / CONFIG, dict(sorted(reference.items())))
    return reference


def merge_lora(source: str | Path, out: str | Path, raw: bool = False, dtype: torch.dtype | None = None,
               to_reference: bool = False, shard_bytes: int | None = SHARD_BYTES) -> tuple[ModelConfig, str]:
    """A LoRA run or checkpoint -> its adapters (EMA unless ``raw``) folded into train.init_from's base, written as
    a pyraflow model directory or, ``to_reference``, as a released folder; returns the config and the weights read."""
    directory, weights = source_weights(source, raw)
    if not (directory / "run.yaml").is_file():
        raise ValueError(f"--merge-lora: {directory} is not a run or checkpoint (no run.yaml); point at a LoRA run.")
    config = load_config(directory / "run.yaml")
    if not config.train.lora.rank:
        raise ValueError(f"--merge-lora: {directory} was trained without LoRA (train.lora.rank 0); its weights are "
                         "whole already: convert it without --merge-lora.")
    model = merge_adapters(trained_model(directory, config, weights))
    state = model.state_dict()
    if to_reference:
        write_reference(model.config, ((k, v if dtype is None else v.to(dtype)) for k, v in state.items()), out, shard_bytes)
    else:
        save_model(model.config, state, out, dtype=dtype)
    return model.config, str(directory / weights)
