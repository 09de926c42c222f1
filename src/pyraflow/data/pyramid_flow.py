"""``data.dataset: pyramid-flow``: the reference's annotation jsonl, trained from as it is.

Video rows ``{"video", "text", "latent", "text_fea"}`` point at latents the reference's tools extracted (``.pt``,
[1, C, T, H/8, W/8], raw VAE output) and text features (``.pt`` dict: prompt_embed, prompt_attention_mask,
pooled_prompt_embed); image rows ``{"image", "text"}`` train where they carry ``latent`` and ``text_fea`` too. ``pyraflow.data.extract`` writes this layout
from raw clips or images with the released VAE and text encoders (``pyraflow prepare --layout pyramid-flow``), as
the reference's tools/extract_* scripts do. Relative paths start at data.root (default: the
jsonl's folder). Every row is checked once when the run starts (shapes read from the file headers, memory-mapped);
rows with a missing or unreadable file or a wrong shape are skipped, counted and logged. Latents are read row by
row when a batch needs them, normalised with latent.shift / scale (and video_shift / video_scale for a clip's
later frames), and grouped into one pool per latent shape, so the token-budget batcher balances them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pyraflow.config import Bucket, Config
from pyraflow.latents import PreparedLatents
from pyraflow.text import read_text_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationRow:
    latent: Path
    text_features: Path
    caption: str
    shape: tuple[int, int, int]  # (T, H, W) of the latent


def latent_shape(path: Path, channels: int) -> tuple[int, int, int]:
    """(T, H, W) of a reference latent file [1, C, T, H, W], read from its header (memory-mapped)."""
    try:
        latent = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise ValueError(f"not a readable torch file ({type(err).__name__})") from None
    if not isinstance(latent, torch.Tensor) or latent.dim() != 5 or latent.shape[0] != 1 or latent.shape[1] != channels:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"latent {shape}; expected [1, {channels}, T, H, W]")
    return tuple(latent.shape[2:])


def read_annotations(path: Path, root: Path, channels: int, max_tokens: int, text_dim: int,
                     pooled_dim: int) -> tuple[list[AnnotationRow], list[tuple[str, str]]]:
    """The usable rows of an annotation jsonl, and (where, why) of every row skipped."""
    rows, bad = [], []
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((where, f"not JSON ({err.msg})"))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            bad.append((where, "no 'text' caption"))
            continue
        if "latent" not in item or "text_fea" not in item:
            kind = "video" if "video" in item else "image"
            bad.append((where, f"{kind} row without 'latent' and 'text_fea': extract them with the reference's "
                               "tools/extract_video_vae_latents.py and tools/extract_text_features.py"))
            continue
        latent, features = root / item["latent"], root / item["text_fea"]
        try:
            for file in (latent, features):
                if not file.is_file():
                    raise ValueError(f"{file} is missing")
            shape = latent_shape(latent, channels)
            text = read_text_features(features, max_tokens)
            if text.tokens.shape[-1] != text_dim or text.pooled.shape[-1] != pooled_dim:
                raise ValueError(f"text features {text.tokens.shape[-1]} / {text.pooled.shape[-1]} wide; the model "
                                 f"takes {text_dim} / {pooled_dim}")
        except ValueError as err:
            bad.append((where, str(err)))
            continue
        rows.append(AnnotationRow(latent, features, item["text"], shape))
    return rows, bad


class PyramidFlowAnnotations:
    """Training data from an annotation jsonl: reads as a prepared cache does (``latent(i)``, ``text(i)``,
    ``pool_sizes``, ``pool_ids``), ids ordered pool by pool, one pool per latent shape (T, H, W)."""

    def __init__(self, config: Config):
        d = config.data
        path = Path(d.path)
        if not path.is_file():
            raise ValueError(f"data.path={d.path!r} is not a file; point it at the reference's annotation .jsonl.")
        root = Path(d.root) if d.root else path.parent
        self.channels = config.latent_channels()
        self.max_tokens = config.text.max_tokens
        self.latent_space = PreparedLatents(config.latent)
        rows, self.bad = read_annotations(path, root, self.channels, self.max_tokens, config.model.text_dim,
                                          config.model.pooled_dim)
        for where, reason in self.bad:
            log.warning("skipped %s (%s)", where, reason)
        total = len(rows) + len(self.bad)
        if not rows:
            first = f"; first: {self.bad[0][0]}: {self.bad[0][1]}" if self.bad else ""
            raise ValueError(f"{path} has no usable row ({total} rows){first}.")
        if len(self.bad) / total > d.max_bad_fraction:
            raise ValueError(f"{len(self.bad)} of {total} rows of {path} are unusable (more than data.max_bad_fraction="
                             f"{d.max_bad_fraction}); first: {self.bad[0][0]} ({self.bad[0][1]}).")
        self.shapes = sorted({row.shape for row in rows})
        self.rows = sorted(rows, key=lambda row: self.shapes.index(row.shape))
        self.pool_sizes = [sum(row.shape == shape for row in rows) for shape in self.shapes]
        self.offsets = [sum(self.pool_sizes[:i]) for i in range(len(self.shapes))]
        self.skipped = len(self.bad)
        self.bad_shards: list = []
        self.skipped_samples = 0

    def __len__(self) -> int:
        return len(self.rows)

    def buckets(self, downsample: int) -> list[Bucket]:
        """One bucket per latent shape, in pixels and latent frames."""
        return [Bucket(h * downsample, w * downsample, t) for t, h, w in self.shapes]

    def pool_ids(self, pool: int, local: list[int]) -> list[int]:
        return [self.offsets[pool] + i for i in local]

    def latent(self, i: int) -> torch.Tensor:
        raw = torch.load(self.rows[i].latent, map_location="cpu", weights_only=True)
        return self.latent_space.normalize(raw[0])

    def text(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_text_features(self.rows[i].text_features, self.max_tokens).item(0)

    def first_captions(self, k: int) -> list[str]:
        return list(dict.fromkeys(row.caption for row in self.rows))[:k]


_READ: dict[tuple, PyramidFlowAnnotations] = {}


def load_annotations(config: Config) -> PyramidFlowAnnotations:
    """The annotations of a run, checked once per process while the jsonl is unchanged (buckets are resolved
    before the data is loaded, from the same rows)."""
    path = Path(config.data.path)
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat and (stat.st_mtime_ns, stat.st_size), config.data.root, config.data.max_bad_fraction,
           repr(config.latent), config.text.max_tokens, config.model.text_dim, config.model.pooled_dim)
    if key not in _READ:
        _READ.clear()
        _READ[key] = PyramidFlowAnnotations(config)
    return _READ[key]

