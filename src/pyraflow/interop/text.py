"""The released Pyramid Flow text encoders, read from a released folder with transformers' own classes and called as
the reference's wrappers call them (same tokenisation, lengths, truncation and outputs):

    te = load_text_encoder(folder, "flux")          # or "mmdit-sd3"; folder = a released pyramid-flow-* folder
    prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = te.encode(prompts)

  flux (miniflux)   pooled: CLIP-L's pooler_output (tokenizer/, text_encoder/);
                    prompt_embeds / mask: T5 over 128 tokens (tokenizer_2/, text_encoder_2/)
  mmdit-sd3         pooled: [CLIP-L text_embeds, CLIP-G text_embeds] (tokenizer/ + text_encoder/, tokenizer_2/ +
                    text_encoder_2/, both at CLIP-L's max length); prompt_embeds / mask: T5 (tokenizer_3/, text_encoder_3/)

CLIP sees no attention mask (its causal mask only) and pools at the first end-of-text token; T5 sees the mask, and
its states at padded positions are returned as they are (not zero): the DiT masks them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

T5_TOKENS = 128  # fixed in the reference's wrappers (_get_t5_prompt_embeds)
SUBFOLDERS = {
    "flux": {"clip": [("tokenizer", "text_encoder")], "t5": ("tokenizer_2", "text_encoder_2")},
    "mmdit-sd3": {"clip": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
                  "t5": ("tokenizer_3", "text_encoder_3")},
}


def released_text_arch(folder: str | Path) -> str:
    """Which wrapper a released folder's encoders belong to: three (CLIP-L, CLIP-G, T5) are sd3's, two flux's."""
    return "mmdit-sd3" if (Path(folder) / "text_encoder_3").is_dir() else "flux"


class ReleasedTextEncoder:
    """The text encoders of a released folder, frozen, in ``dtype`` on ``device``."""

    def __init__(self, folder: str | Path, arch: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
        from transformers.utils import logging as hf_logging

        if arch not in SUBFOLDERS:
            raise ValueError(f"text encoder arch {arch!r} is not a released Pyramid Flow model; use flux or mmdit-sd3.")
        folder = Path(folder)
        layout = SUBFOLDERS[arch]
        needed = [name for pair in layout["clip"] for name in pair] + list(layout["t5"])
        missing = [name for name in needed if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; point at a released pyramid-flow-* folder "
                                    f"(its {arch} text encoders and tokenizers).")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.arch, self.device = arch, torch.device(device)
        clip_class = CLIPTextModel if arch == "flux" else CLIPTextModelWithProjection

        def frozen(model):
            return model.eval().requires_grad_(False).to(self.device)

        self.clips = [(AutoTokenizer.from_pretrained(folder / tokenizer),
                       frozen(clip_class.from_pretrained(folder / encoder, dtype=dtype)))
                      for tokenizer, encoder in layout["clip"]]
        tokenizer, encoder = layout["t5"]
        self.t5 = (AutoTokenizer.from_pretrained(folder / tokenizer),
                   frozen(T5EncoderModel.from_pretrained(folder / encoder, dtype=dtype)))
        # sd3's wrapper pads both CLIPs to CLIP-L's length
        self.clip_tokens = self.clips[0][0].model_max_length

    def to(self, device: torch.device | str) -> "ReleasedTextEncoder":
        """Move every encoder to ``device`` (pyraflow.sample.Pipeline's offload moves them on and off the GPU)."""
        self.device = torch.device(device)
        for _, model in (*self.clips, self.t5):
            model.to(self.device)
        return self

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The token ids each encoder gets (and T5's mask), as the reference's tokenizer calls produce them."""
        ids = {}
        self._warn_truncated(prompts)
        for name, (tokenizer, _) in zip(("clip_l", "clip_g"), self.clips):
            ids[f"{name}.input_ids"] = tokenizer(prompts, padding="max_length", max_length=self.clip_tokens,
                                                 truncation=True, return_tensors="pt").input_ids
        t5 = self.t5[0](prompts, padding="max_length", max_length=T5_TOKENS, truncation=True, return_tensors="pt")
        ids["t5.input_ids"], ids["t5.attention_mask"] = t5.input_ids, t5.attention_mask
        return ids

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Name each prompt longer than an encoder takes: it is cut as the reference cuts it, but the user should know."""
        limits = [("CLIP", self.clips[0][0], self.clip_tokens), ("T5", self.t5[0], T5_TOKENS)]
        for name, tokenizer, limit in limits:
            for prompt, tokens in zip(prompts, tokenizer(prompts, truncation=False).input_ids):
                if len(tokens) > limit:
                    log.warning("prompt %r is %d %s tokens long; the encoder keeps the first %d (as the reference "
                                "truncates it)", prompt[:60] + ("..." if len(prompt) > 60 else ""), len(tokens), name,
                                limit)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds (N, 128, D_t5), prompt_attention_mask (N, 128) int64, pooled_prompt_embeds (N, D_pooled)),
        as the reference's FluxTextEncoderWithMask / SD3TextEncoderWithMask return them."""
        ids = self.tokenize(list(prompts))
        pooled = []
        for name, (_, model) in zip(("clip_l", "clip_g"), self.clips):
            out = model(input_ids=ids[f"{name}.input_ids"].to(self.device))
            pooled.append(out.pooler_output if self.arch == "flux" else out.text_embeds)
        mask = ids["t5.attention_mask"].to(self.device)
        embeds = self.t5[1](input_ids=ids["t5.input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        return embeds, mask, torch.cat(pooled, dim=-1)


def load_text_encoder(folder: str | Path, arch: str | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> ReleasedTextEncoder:
    """The text encoders of a released folder; ``arch`` (flux or mmdit-sd3) is read from its subfolders if not given."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} does not exist; point at a released pyramid-flow-* folder.")
    return ReleasedTextEncoder(folder, arch or released_text_arch(folder), device, dtype)
