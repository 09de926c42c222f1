"""Model directories, the one home of weights on disk: ``config.json`` + safetensors, read and written here only.

    DIR/config.json                          a pyraflow ModelConfig's fields (a released folder: diffusers' config)
    DIR/model.safetensors                    the weights in one file, or shards + an index:
    DIR/model-0000i-of-0000n.safetensors     ...
    DIR/model.safetensors.index.json         {"weight_map": {tensor name: shard file}}
    DIR/ema.safetensors                      a checkpoint's EMA weights (beside its model.safetensors)

A pyraflow model directory, a checkpoint and a released Pyramid Flow folder (``diffusion_pytorch_model*``) are all
read by these functions, so the file names, the atomic writes and the error for an unreadable file exist once.
Tensors can be streamed one at a time (``read_tensors``), so converting or loading never needs a second copy of a
model in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterable, Iterator

import torch

from pyraflow.config import ModelConfig, drop_retired
from pyraflow.storage import atomic_path, write_json

CONFIG = "config.json"
MODEL = "model.safetensors"  # a model directory's weights, a checkpoint's trained weights
EMA = "ema.safetensors"  # a checkpoint's EMA weights
NULL_TEXT = "null_text.safetensors"  # a checkpoint's learned empty-prompt features
OPTIMIZER = "optimizer.safetensors"  # a checkpoint's AdamW state, "<parameter>.<key>", read by rows on resume
DIGIT_CLASSIFIER = "digit_classifier.safetensors"  # the MNIST eval's classifier, trained once per run
REFERENCE = "diffusion_pytorch_model.safetensors"  # a released Pyramid Flow transformer's weights
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json lists the shards of model.safetensors


def index_name(weights: str) -> str:
    return weights + INDEX_SUFFIX


# ----- config.json --------------------------------------------------------------------------------------------

def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``, with named errors for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; point at a model directory, a checkpoint or a released folder.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged, write or download it again.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds {type(raw).__name__}, not a JSON object; the file is damaged.")
    return raw


def read_model_config(path: str | Path) -> dict:
    """The fields of a pyraflow model config.json, checked to be ModelConfig fields (retired ones dropped)."""
    raw = read_json(path)
    try:
        drop_retired({"model": raw})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    unknown = set(raw) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"{path} has unknown model fields {sorted(unknown)}; was it written by pyraflow?")
    return raw


def write_model_config(directory: str | Path, config: ModelConfig) -> None:
    write_json(Path(directory) / CONFIG, asdict(config))


# ----- safetensors ----------------------------------------------------------------------------------------------

def weight_files(directory: str | Path, weights: str = MODEL) -> list[Path]:
    """The files holding ``weights`` in ``directory``: the shards its index names, or the single file."""
    directory = Path(directory)
    index = directory / index_name(weights)
    if index.is_file():
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index (no weight_map: {err}); write or download it again.") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: shards {missing} named by {index.name} are missing; write or "
                                    "download them again.")
        return [directory / s for s in shards]
    single = directory / weights
    if not single.is_file():
        raise FileNotFoundError(f"{directory} has neither {weights} nor {index.name}; point at a pyraflow model "
                                "directory or checkpoint, or a released diffusion_transformer_* folder.")
    return [single]


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} cannot be read as safetensors ({err}); the file is corrupt: write or download it again, "
                      "or use an earlier checkpoint (checkpoints/step-N).")


def tensor_names(files: Iterable[Path]) -> set[str]:
    """The tensor names stored in ``files``, read from their headers alone."""
    from safetensors import SafetensorError, safe_open

    names: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names |= set(handle.keys())
        except (SafetensorError, OSError) as err:
            raise _unreadable(path, err) from err
    return names


def read_tensors(files: Iterable[Path], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time from safetensors files, each read (and cast to ``dtype``) and handed on alone."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    yield name, tensor if dtype is None else tensor.to(dtype)
        except (SafetensorError, OSError) as err:
            raise _unreadable(path, err) from err


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file."""
    return dict(read_tensors([Path(path)]))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """One safetensors file, published atomically (tensors copied to the CPU, made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


# safetensors' names of the dtypes a checkpoint holds (its format: an 8-byte little-endian header size, a JSON
# header of names, dtypes, shapes and byte ranges, then the bytes of every tensor back to back)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def stream_tensors(specs: list[tuple[str, torch.Size, torch.dtype]], tensors: Iterable[torch.Tensor],
                   path: str | Path) -> None:
    """One safetensors file written a tensor at a time, published atomically: the header comes from ``specs``
    (name, shape, dtype: a sharded model knows its full shapes before any tensor is gathered), then each of
    ``tensors`` (in the specs' order) is appended and dropped, so writing holds one tensor, never the whole file."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: safetensors has no {dtype}")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for (name, shape, dtype), tensor in zip(specs, tensors, strict=True):
            if tensor.shape != torch.Size(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the header says {tuple(shape)} {dtype}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_weights(tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path, weights: str = MODEL,
                  shard_bytes: int | None = None) -> None:
    """(name, tensor) pairs as ``weights`` in one file, or, past ``shard_bytes``, as shards named as diffusers names
    them (``stem-0000i-of-0000n.safetensors``) plus the index; each file published atomically, one shard's tensors
    held at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = weights.removesuffix(".safetensors")
    shard: dict[str, torch.Tensor] = {}
    written: list[str] = []  # shard files under provisional names, renamed once their count is known
    weight_map: dict[str, int] = {}
    size = total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes and shard and size + nbytes > shard_bytes:
            written.append(f"{stem}-part{len(written) + 1:05d}.safetensors")
            save_tensors(shard, directory / written[-1])
            shard, size = {}, 0
        shard[name] = tensor
        weight_map[name] = len(written)
        size += nbytes
        total += nbytes
    if not written:
        save_tensors(shard, directory / weights)
        return
    written.append(f"{stem}-part{len(written) + 1:05d}.safetensors")
    save_tensors(shard, directory / written[-1])
    final = [f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for old, new in zip(written, final):
        (directory / old).replace(directory / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in sorted(weight_map.items())}}
    write_json(directory / index_name(weights), index)


def save_model(config: ModelConfig, state: dict[str, torch.Tensor], directory: str | Path, weights: str = MODEL,
               dtype: torch.dtype | None = None) -> None:
    """A model directory: ``config``'s config.json and ``state`` as ``weights`` (cast to ``dtype`` if given)."""
    write_weights(((k, v if dtype is None else v.to(dtype)) for k, v in state.items()), directory, weights)
    write_model_config(directory, config)


class StoredTensors:
    """The tensors of safetensors files, read by name, whole or a range of rows, only when asked: a rank of a
    sharded run reads just the rows it holds (safetensors reads slices from the file without loading the rest)."""

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self.files = list(files)
        self._handles = []
        self._where: dict[str, int] = {}
        for path in self.files:
            try:
                handle = safe_open(str(path), framework="pt")
                self._where.update({name: len(self._handles) for name in handle.keys()})
            except Exception as err:
                raise _unreadable(path, err) from err
            self._handles.append(handle)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> list[int]:
        """The stored shape of ``name``, read from the header alone."""
        return self._handles[self._where[name]].get_slice(name).get_shape()

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or its rows ``rows`` (first dimension)."""
        if name not in self._where:
            raise ValueError(f"{', '.join(map(str, self.files))} hold no tensor {name!r}; the weights are incomplete or "
                             "of another model.")
        handle = self._handles[self._where[name]]
        try:
            return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        except Exception as err:
            raise _unreadable(self.files[self._where[name]], err) from err
