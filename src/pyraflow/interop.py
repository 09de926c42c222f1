"""The released Pyramid Flow transformers in and out of pyraflow: their folders (diffusers ``config.json`` +
``diffusion_pytorch_model*.safetensors``, one file or shards with an index) to pyraflow models and checkpoints and
back, and their calling convention computed by pyraflow's packed path.

The reference's modules already carry diffusers' names, and pyraflow's flux / mmdit-sd3 architectures use the same
ones, so conversion translates the config and streams the tensors one at a time (peak memory about the model's own
size). What the reference does its own way (text at temporal id 0, the flux patch fixed at 2 x 2 with channels last,
the sd3 position table, timesteps on the 0..1000 axis) lives in the architectures (pyraflow.archs).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from pyraflow.archs import build_model, load_model
from pyraflow.config import ModelConfig
from pyraflow.model import WEIGHTS, PackedTransformer, read_model_config
from pyraflow.packing import HistoryPart, Sample, pack, unpack
from pyraflow.storage import atomic_path

CLASS_ARCH = {"PyramidFluxTransformer": "flux", "PyramidDiffusionMMDiT": "mmdit-sd3"}
ARCH_CLASS = {arch: name for name, arch in CLASS_ARCH.items()}
REFERENCE_WEIGHTS = "diffusion_pytorch_model.safetensors"
REFERENCE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# What the reference's build_pyramid_dit passes at load time, over whatever a released config.json says.
LOAD_KWARGS = {
    "flux": {"use_temporal_causal": True, "interp_condition_pos": True, "use_flash_attn": False},
    "mmdit-sd3": {"use_temporal_causal": True, "interp_condition_pos": True, "use_flash_attn": False,
                  "temp_pos_embed_type": "rope", "add_temp_pos_embed": True, "use_t5_mask": True},
}
DIFFUSERS_VERSION = "0.30.0"


def is_reference_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") in CLASS_ARCH
    except json.JSONDecodeError:
        return False


# ----- configs ----------------------------------------------------------------------------------------------

def model_config_from_reference(reference: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig of a released transformer's config.json (its class named by ``_class_name``)."""
    name = reference.get("_class_name")
    if name not in CLASS_ARCH:
        raise ValueError(f"{where}: _class_name={name!r} is not a Pyramid Flow transformer; expected one of "
                         f"{', '.join(CLASS_ARCH)} (point at a diffusion_transformer_* folder).")
    arch = CLASS_ARCH[name]
    ref = {**reference, **LOAD_KWARGS[arch]}
    try:
        heads, head_dim = int(ref["num_attention_heads"]), int(ref["attention_head_dim"])
        common = dict(arch=arch, num_heads=heads, width=heads * head_dim, depth=int(ref["num_layers"]),
                      text_dim=int(ref["joint_attention_dim"]), pooled_dim=int(ref["pooled_projection_dim"]),
                      temporal_causal=True, mlp_ratio=4.0)
        if arch == "flux":
            if int(ref.get("patch_size", 1)) != 1:
                raise ValueError(f"{where}: patch_size={ref['patch_size']}; the reference flux transformer only works "
                                 "with 1 (it patchifies 2 x 2 itself and sizes its output by patch_size).")
            if int(ref["in_channels"]) % 4:
                raise ValueError(f"{where}: in_channels={ref['in_channels']} is not 4 x the latent channels.")
            return ModelConfig(**common, in_channels=int(ref["in_channels"]) // 4, patch_size=2,
                               single_depth=int(ref["num_single_layers"]),
                               rope_axes=[int(a) for a in ref.get("axes_dims_rope", [16, 24, 24])])
        if ref.get("pos_embed_type", "sincos") != "sincos" or ref.get("qk_norm", "rms_norm") != "rms_norm":
            raise ValueError(f"{where}: pos_embed_type={ref.get('pos_embed_type')!r}, qk_norm={ref.get('qk_norm')!r}; "
                             "the released sd3 transformer (and pyraflow) use 'sincos' and 'rms_norm'.")
        if int(ref.get("caption_projection_dim", heads * head_dim)) != heads * head_dim:
            raise ValueError(f"{where}: caption_projection_dim must equal num_attention_heads x attention_head_dim.")
        return ModelConfig(**common, in_channels=int(ref["in_channels"]), patch_size=int(ref["patch_size"]),
                           sample_size=int(ref["sample_size"]), pos_embed_max_size=int(ref["pos_embed_max_size"]))
    except KeyError as err:
        raise ValueError(f"{where} lacks {err}; is it a complete diffusers config of a {name}?") from None


def reference_config(config: ModelConfig) -> dict:
    """The config.json the reference's from_pretrained builds ``config``'s architecture from."""
    if config.arch not in ARCH_CLASS:
        raise ValueError(f"model.arch={config.arch!r} has no Pyramid Flow counterpart; only flux and mmdit-sd3 export.")
    common = {"_class_name": ARCH_CLASS[config.arch], "_diffusers_version": DIFFUSERS_VERSION,
              "num_layers": config.depth, "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
              "joint_attention_dim": config.text_dim, "pooled_projection_dim": config.pooled_dim,
              "use_gradient_checkpointing": False, "gradient_checkpointing_ratio": 0.6}
    if config.arch == "flux":
        return {**common, "patch_size": 1, "in_channels": 4 * config.in_channels, "num_single_layers": config.single_depth,
                "axes_dims_rope": config.axes(), **LOAD_KWARGS["flux"]}
    return {**common, "sample_size": config.sample_size, "patch_size": config.patch_size,
            "in_channels": config.in_channels, "caption_projection_dim": config.width,
            "pos_embed_max_size": config.pos_embed_max_size, "max_num_frames": 200, "qk_norm": "rms_norm",
            "pos_embed_type": "sincos", **LOAD_KWARGS["mmdit-sd3"]}


# ----- weights ----------------------------------------------------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a released folder: the index's shards, or the single file."""
    index = folder / REFERENCE_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is not a safetensors index ({err}); re-download the folder.") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shards {missing} named by {index.name} are missing; re-download them.")
        return [folder / s for s in shards]
    single = folder / REFERENCE_WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither {REFERENCE_WEIGHTS} nor {REFERENCE_INDEX}; point at a released "
                                "diffusion_transformer_* folder.")
    return [single]


def read_tensors(files: list[Path], dtype: torch.dtype | None = None):
    """(name, tensor) one at a time from safetensors files (each tensor read, cast and handed on alone)."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    yield name, tensor if dtype is None else tensor.to(dtype)
        except SafetensorError as err:
            raise ValueError(f"{path} cannot be read ({err}); the file is damaged.") from err


def check_keys(config: ModelConfig, names: set[str], where: str) -> None:
    """The tensor names must be exactly those of ``config``'s architecture."""
    with torch.device("meta"):
        expected = set(build_model(config).state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(f"{where} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
                         f" ({len(missing)} / {len(unexpected)} in all).")


def write_weights(tensors, directory: Path, shard_bytes: int | None, single_name: str, index_name: str) -> None:
    """Write (name, tensor) pairs as one safetensors file, or as shards of at most ``shard_bytes`` plus an index;
    each file published atomically, the tensors of one shard held at a time."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    total = 0
    written: list[str] = []

    def flush(name: str) -> None:
        with atomic_path(directory / name) as tmp:
            save_file(shards[-1], str(tmp), metadata={"format": "pt"})
        written.append(name)

    stem = single_name.removesuffix(".safetensors")
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes and size and size + nbytes > shard_bytes:
            flush(f"{stem}-part{len(shards):05d}.safetensors")
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        weight_map[name] = f"{stem}-part{len(shards):05d}.safetensors"
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        with atomic_path(directory / single_name) as tmp:
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        return
    flush(f"{stem}-part{len(shards):05d}.safetensors")
    # name shards as diffusers does: -0000i-of-0000n
    n = len(written)
    renamed = {old: f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(written)}
    for old, new in renamed.items():
        (directory / old).replace(directory / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    with atomic_path(directory / index_name) as tmp:
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True))


def import_reference(folder: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> ModelConfig:
    """A released transformer folder -> a pyraflow model directory (config.json + model.safetensors), which
    ``pyraflow.archs.load_model`` and ``train.init_from`` read. Tensors keep their dtype unless ``dtype`` is given."""
    folder, out = Path(folder), Path(out)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; point at a released diffusion_transformer_* folder.")
    try:
        reference = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); re-download the folder.") from None
    config = model_config_from_reference(reference, str(config_path))
    files = weight_files(folder)
    from safetensors import safe_open

    names = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names |= set(handle.keys())
    check_keys(config, names, str(folder))
    out.mkdir(parents=True, exist_ok=True)
    write_weights(read_tensors(files, dtype), out, None, WEIGHTS, WEIGHTS + ".index.json")
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(asdict(config), indent=2))
    return config


def export_reference(source: str | Path, out: str | Path, weights: str = WEIGHTS, dtype: torch.dtype | None = None,
                     shard_bytes: int | None = 10 * 2**30) -> dict:
    """A pyraflow model directory (or checkpoint, ``weights='ema.safetensors'`` for its EMA) -> a folder the
    reference's ``PyramidFluxTransformer / PyramidDiffusionMMDiT.from_pretrained`` loads."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source / 'config.json'} is missing; point at a pyraflow run, checkpoint or model "
                                "directory (pyraflow convert --from writes one).")
    config = ModelConfig(**read_model_config(source / "config.json"))
    if not (source / weights).is_file():
        raise FileNotFoundError(f"{source / weights} is missing; point at a pyraflow checkpoint or model directory.")
    from safetensors import safe_open

    with safe_open(str(source / weights), framework="pt") as handle:
        names = set(handle.keys())
    if any("lora_" in name for name in names):
        raise ValueError(f"{source / weights} holds LoRA adapters, not a whole model; export it with "
                         "pyraflow convert --to pyramid-flow RUN --merge-lora.")
    check_keys(config, names, str(source / weights))
    return write_reference(config, read_tensors([source / weights], dtype), out, shard_bytes)


def write_reference(config: ModelConfig, tensors, out: str | Path, shard_bytes: int | None = 10 * 2**30) -> dict:
    """Write (name, tensor) pairs of ``config``'s architecture as a released folder: its config.json and weights."""
    out = Path(out)
    reference = reference_config(config)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(tensors, out, shard_bytes, REFERENCE_WEIGHTS, REFERENCE_INDEX)
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(reference, indent=2, sort_keys=True))
    return reference


RUNTIME_FIELDS = ("attention", "checkpoint_fraction")  # how a model runs, not what it computes


def architecture(config: ModelConfig) -> dict:
    """What a ModelConfig computes: its fields less the runtime ones, defaults resolved (RoPE axes)."""
    fields = {k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS}
    return {**fields, "rope_axes": config.axes()}


def stored_weights(path: str | Path, weights: str = WEIGHTS, dtype: torch.dtype | None = None):
    """(ModelConfig, iterator of (name, tensor)) of a released folder or a pyraflow model directory / checkpoint,
    the tensors read one at a time."""
    path = Path(path)
    if is_reference_folder(path):
        config = model_config_from_reference(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        return config, read_tensors(weight_files(path), dtype)
    config_path, weights_path = path / "config.json", path / weights
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; point at a released diffusion_transformer_* folder, a pyraflow "
                                    "checkpoint or a directory written by save_pretrained / pyraflow convert.")
    return ModelConfig(**read_model_config(config_path)), read_tensors([weights_path], dtype)


def load_weights_into(model: PackedTransformer, path: str | Path, weights: str = WEIGHTS) -> None:
    """Copy the weights stored at ``path`` into ``model`` tensor by tensor (no second copy of the model in memory);
    the stored architecture must be the model's (runtime fields such as the attention backend may differ)."""
    config, tensors = stored_weights(path, weights)
    ours, theirs = architecture(model.config), architecture(config)
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ValueError(f"the weights at {path} are of another architecture than model: ({'; '.join(differ)}); set "
                         "the model section to theirs (the fine-tuning presets carry the released shapes).")
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


def load(path: str | Path, weights: str = WEIGHTS, **overrides) -> PackedTransformer:
    """The model (fp32) of a released folder, read in place, or of a pyraflow model directory / checkpoint;
    ``overrides`` change runtime fields (e.g. ``attention='flex'``)."""
    if not is_reference_folder(path):
        return load_model(path, weights, **overrides)
    config, _ = stored_weights(path)
    model = build_model(ModelConfig(**{**asdict(config), **overrides}))
    load_weights_into(model, path)
    return model


# ----- the reference's calling convention ---------------------------------------------------------------------

def reference_samples(sample: list, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                      pooled_projections: torch.Tensor, timestep_ratio: torch.Tensor) -> list[Sample]:
    """The reference's inputs as pyraflow samples, column-major (column c, then its rows): row b of column c uses
    text row b * n + c; its clips become history parts (oldest first) and the predicted latent, each frame its own
    causal step counted over the clips; padded text tokens are dropped (the reference lets no valid token see them)."""
    n = len(sample)
    samples = []
    for c, column in enumerate(sample):
        clips = column if isinstance(column, (list, tuple)) else [column]
        for b in range(clips[-1].shape[0]):
            r = b * n + c
            valid = encoder_attention_mask[r].bool()
            if not bool(valid.any()):
                raise ValueError(f"text row {r} has no valid token; the reference's mask needs at least one 1 per row.")
            timestep = float(timestep_ratio[r])
            history, frame = [], 0
            for clip in clips[:-1]:
                history.append(HistoryPart(stage=0, latent=clip[b], timestep=timestep, first_frame=frame, unit=None))
                frame += clip.shape[2]
            samples.append(Sample(stage=0, latent=clips[-1][b], text=encoder_hidden_states[r][valid],
                                  pooled=pooled_projections[r], timestep=timestep, history=history, first_frame=frame))
    return samples


def reference_forward(model: PackedTransformer, sample: list, encoder_hidden_states: torch.Tensor,
                      encoder_attention_mask: torch.Tensor, pooled_projections: torch.Tensor,
                      timestep_ratio: torch.Tensor) -> list[torch.Tensor]:
    """The reference DiT's ``forward`` (same arguments, same outputs: a list over columns of [b, C, T, H, W] for each
    column's last clip), computed as one packed batch through ``model``'s attention backend."""
    samples = reference_samples(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep_ratio)
    cfg = model.config
    batch = pack(samples, num_stages=1, patch_size=cfg.patch_size, channels=cfg.in_channels, text_dim=cfg.text_dim,
                 pooled_dim=cfg.pooled_dim)
    predicted = unpack(model(batch), batch.layout)
    outputs, start = [], 0
    for column in sample:
        rows = (column[-1] if isinstance(column, (list, tuple)) else column).shape[0]
        outputs.append(torch.stack(predicted[start : start + rows]))
        start += rows
    return outputs
