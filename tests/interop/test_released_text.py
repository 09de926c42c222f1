"""The released text encoders (pyraflow.interop.text) against the reference's recorded calls on tiny released folders
(tests/fixtures/pyramid-flow-pipeline, made by the reference's own wrappers): token ids exactly, outputs within 1e-4
(the reference's own fp32-vs-fp64 gap is ~2e-6); and the same encoders as pyraflow's text.encoder=pyramid-flow."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyraflow.config import load_config
from pyraflow.interop import load_text_encoder
from pyraflow.text import load_text_encoder as load_run_text_encoder

FIXTURES = Path(__file__).parent.parent / "fixtures" / "pyramid-flow-pipeline"
CASES = {"flux": ("flux", "pyramid-flow-miniflux-tiny"), "mmdit-sd3": ("sd3", "pyramid-flow-sd3-tiny")}


def case(arch: str):
    name, folder = CASES[arch]
    description = json.loads((FIXTURES / "text" / f"case-text-{name}.json").read_text())
    tensors = {k: v.clone() for k, v in load_file(str(FIXTURES / "text" / f"case-text-{name}.safetensors")).items()}
    return description["prompts"], tensors, FIXTURES / "released" / folder


@pytest.mark.parametrize("arch", list(CASES))
def test_the_released_encoders_give_the_references_tokens_and_outputs(arch, parity):
    prompts, recorded, folder = case(arch)
    encoder = load_text_encoder(folder)  # the arch is read from the folder
    assert encoder.arch == arch
    tokens = encoder.tokenize(prompts)
    assert set(tokens) == {k.removeprefix("tokens.") for k in recorded if k.startswith("tokens.")}
    for name, ids in tokens.items():
        assert torch.equal(ids, recorded[f"tokens.{name}"]), name
    embeds, mask, pooled = encoder.encode(prompts)
    assert torch.equal(mask.long(), recorded["output.prompt_attention_mask"])
    for ours, key in ((embeds, "prompt_embeds"), (pooled, "pooled_prompt_embeds")):
        parity(f"text encoders {arch}: {key}", ours, recorded[f"output.{key}"])
    # padded T5 positions are returned as computed, not zeroed (the DiT masks them)
    assert embeds[mask == 0].abs().max() > 0


def test_a_folder_without_its_encoders_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer, text_encoder, tokenizer_2, text_encoder_2"):
        load_text_encoder(tmp_path)
    with pytest.raises(ValueError, match="use flux or mmdit-sd3"):
        load_text_encoder(tmp_path, "unet")


def test_a_run_encodes_captions_with_the_released_encoders(parity):
    """text.encoder=pyramid-flow: each caption's valid T5 states (cut at text.max_tokens) and the pooled CLIP vector."""
    prompts, recorded, folder = case("mmdit-sd3")
    config = load_config(None, ["text.encoder=pyramid-flow", f"text.path={folder}", "text.max_tokens=20"])
    encoder = load_run_text_encoder(config.text)
    assert (encoder.width, encoder.pooled_width) == (48, 40)
    embedding = encoder.encode(prompts)
    lengths = recorded["output.prompt_attention_mask"].sum(1).clamp(max=20)
    assert torch.equal(embedding.lengths, lengths)
    for i, length in enumerate(lengths.tolist()):
        parity("text encoders mmdit-sd3, a run's tokens", embedding.tokens[i, :length],
               recorded["output.prompt_embeds"][i, :length])
        assert not embedding.tokens[i, length:].any()
    parity("text encoders mmdit-sd3, a run's pooled", embedding.pooled, recorded["output.pooled_prompt_embeds"])
    with pytest.raises(ValueError, match="text.path"):
        load_config(None, ["text.encoder=pyramid-flow"])


def test_a_prompt_longer_than_an_encoder_takes_is_cut_with_a_warning(caplog):
    _, _, folder = case("flux")
    encoder = load_text_encoder(folder)
    long = " ".join(["snow"] * 200)
    embeds, mask, _ = encoder.encode([long, "a cat"])
    assert embeds.shape[1] == 128 and mask[0].all()  # cut to T5's 128 tokens, every one of them valid
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("CLIP tokens long; the encoder keeps the first 77" in w for w in warnings)
    assert any("T5 tokens long; the encoder keeps the first 128" in w for w in warnings)
    assert not any("'a cat'" in w for w in warnings)
