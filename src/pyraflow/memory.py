"""Peak memory of a computation without running it: ``LiveBytes`` counts, op by op, the bytes of every tensor that
is alive (from the op that allocates it until its last reference goes), so a run on the meta device gives the
peak that the same code holds in the tensors it makes, in no time and with no memory. Views and in-place results
cost nothing; what a kernel allocates for itself (cuDNN's workspace, the CPU convolutions' unfolded inputs) and the
caching allocator's slack are not seen, so the figure is a floor (BENCHMARKS.md compares it with a measured peak).

``vae_decode_memory`` applies it to the released causal video VAE (``pyraflow plan --vae-decode``): the peak of a
decode of a 384p or 768p clip of 5 or 10 s, whole, in temporal chunks, in spatial tiles, or both, as the reference's
pipeline decodes (window 2 latent frames and 512-pixel tiles; 1 and 256 with its save_memory).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Inside ``with LiveBytes() as counter:``, ``counter.peak`` is the most bytes the tensors allocated inside held
    at once (inputs made before it are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # a view or in-place result: no new memory
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    size = t.untyped_storage().nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


# The released causal video VAE (pyramid-flow-miniflux and -sd3 share it): 16 latent channels, 8x in space and time.
RELEASED_VAE = {
    "_class_name": "CausalVideoVAE", "encoder_in_channels": 3, "encoder_out_channels": 16, "decoder_in_channels": 16,
    "decoder_out_channels": 3, "encoder_block_out_channels": [128, 256, 512, 512],
    "decoder_block_out_channels": [128, 256, 512, 512], "encoder_layers_per_block": [2, 2, 2, 2],
    "decoder_layers_per_block": [3, 3, 3, 3], "encoder_norm_num_groups": 32, "decoder_norm_num_groups": 32,
    "encoder_spatial_down_sample": [True, True, True, False], "encoder_temporal_down_sample": [True, True, True, False],
    "decoder_spatial_up_sample": [True, True, True, False], "decoder_temporal_up_sample": [True, True, True, False],
    "encoder_double_z": True, "add_post_quant_conv": True,
}
CLIPS = {"384p": (384, 640), "768p": (768, 1280)}  # the released transformers' clip sizes
SECONDS = {5: 16, 10: 31}  # latent frames: 121 and 241 video frames at 24 fps
SETTINGS = {  # name: (window in latent frames, tile in pixels); None = whole
    "reference (window 2, tile 512)": (2, 512),
    "reference save_memory (window 1, tile 256)": (1, 256),
    "chunked only (window 2)": (2, None),
    "tiled only (tile 512)": (None, 512),
    "whole": (None, None),
}


def vae_config(folder: str | Path | None = None) -> dict:
    """A released folder's (or its causal_video_vae/'s) VAE config; None: the released VAE's sizes."""
    if folder is None:
        return dict(RELEASED_VAE)
    from pyraflow.interop.vae import read_json

    folder = Path(folder)
    if (folder / "causal_video_vae").is_dir():
        folder = folder / "causal_video_vae"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; point --vae-decode at a released folder or its causal_video_vae/.")
    return read_json(folder / "config.json")


def vae_decode_memory(config: dict, latent_frames: int, height: int, width: int, window: int | None,
                      tile: int | None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes a decode of a (1, 16, latent_frames, height/8, width/8) latent holds at its peak (activations, the
    convolutions' carried frames and the output; measured on the meta device) and the VAE's weights."""
    from pyraflow.interop.vae import CausalVideoVAE

    with torch.device("meta"):
        vae = CausalVideoVAE(config).to(dtype).eval()
        latent = torch.empty(1, vae.latent_channels, latent_frames, height // 8, width // 8, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    weights += sum(p.numel() * p.element_size() for p in vae.post_quant_conv.parameters())
    with torch.no_grad(), LiveBytes() as counter:
        frames = vae.decode(latent, window=window, tile=tile)
    return {"weights_bytes": weights, "peak_bytes": counter.peak, "frames": frames.shape[2],
            "output_bytes": frames.numel() * frames.element_size()}


def vae_decode_table(folder: str | Path | None = None, progress: bool = True) -> dict:
    """Decode memory of every clip (384p / 768p, 5 s / 10 s) under every setting, in bf16 (the reference's) and fp32."""
    from tqdm import tqdm

    config = vae_config(folder)
    cases = [(clip, size, seconds, frames, setting, window_tile) for clip, size in CLIPS.items()
             for seconds, frames in SECONDS.items() for setting, window_tile in SETTINGS.items()]
    rows = []
    for clip, (height, width), seconds, latent_frames, setting, (window, tile) in tqdm(
            cases, desc="plan vae-decode", unit="case", disable=not progress):
        row = {"clip": clip, "seconds": seconds, "setting": setting, "window": window, "tile": tile}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            row[name] = vae_decode_memory(config, latent_frames, height, width, window, tile, dtype)
        rows.append(row)
    return {"vae": str(folder) if folder else "released sizes", "rows": rows,
            "measure": "peak bytes of the tensors a decode holds at once, on the meta device (LiveBytes), plus weights"}


def format_vae_table(table: dict) -> str:
    gib = 2**30
    lines = [f"VAE decode memory ({table['vae']}): peak of activations and output, + weights; GiB",
             f"{'clip':<12}{'setting':<46}{'bf16':>8}{'fp32':>8}"]
    for row in table["rows"]:
        frames = row["bf16"]["frames"]
        clip = f"{row['clip']} {row['seconds']}s"
        lines.append(f"{clip:<12}{row['setting']:<46}"
                     + "".join(f"{(row[d]['peak_bytes'] + row[d]['weights_bytes']) / gib:>8.1f}" for d in ("bf16", "fp32"))
                     + f"   ({frames} frames)")
    return "\n".join(lines)
