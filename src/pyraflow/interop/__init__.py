"""The released Pyramid Flow models as pyraflow sees them: the transformers' diffusers ``config.json`` mapped to a
ModelConfig and back, and their calling convention (``forward``'s arguments) computed by pyraflow's packed path; the
text encoders and the causal video VAE of a released folder in ``pyraflow.interop.text`` (``load_text_encoder``) and
``pyraflow.interop.vae`` (``load_vae``).

The reference's modules already carry diffusers' names, and pyraflow's flux / mmdit-sd3 architectures use the same
ones, so the weights need no renaming (pyraflow.convert streams them; pyraflow.archs.load_model reads a released
folder in place). What the reference does its own way (text at temporal id 0, the flux patch fixed at 2 x 2 with
channels last, the sd3 position table, timesteps on the 0..1000 axis) lives in the architectures (pyraflow.archs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pyraflow.config import ModelConfig
from pyraflow.interop.text import load_text_encoder
from pyraflow.interop.vae import load_vae
from pyraflow.packing import HistoryPart, Sample, pack, unpack
from pyraflow.weights import CONFIG

__all__ = ["ARCH_CLASS", "CLASS_ARCH", "LOAD_KWARGS", "is_reference_folder", "load_text_encoder", "load_vae",
           "model_config_from_reference", "reference_config", "reference_forward", "reference_samples"]

CLASS_ARCH = {"PyramidFluxTransformer": "flux", "PyramidDiffusionMMDiT": "mmdit-sd3"}
ARCH_CLASS = {arch: name for name, arch in CLASS_ARCH.items()}
# What the reference's build_pyramid_dit passes at load time, over whatever a released config.json says.
LOAD_KWARGS = {
    "flux": {"use_temporal_causal": True, "interp_condition_pos": True, "use_flash_attn": False},
    "mmdit-sd3": {"use_temporal_causal": True, "interp_condition_pos": True, "use_flash_attn": False,
                  "temp_pos_embed_type": "rope", "add_temp_pos_embed": True, "use_t5_mask": True},
}
DIFFUSERS_VERSION = "0.30.0"


def is_reference_folder(path: str | Path) -> bool:
    config = Path(path) / CONFIG
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


def reference_forward(model: torch.nn.Module, sample: list, encoder_hidden_states: torch.Tensor,
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
