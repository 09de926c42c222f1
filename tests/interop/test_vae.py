"""The released causal video VAE (pyraflow.interop.vae) against the reference's recorded calls on its tiny released
weights (tests/fixtures/pyramid-flow-pipeline/vae and pipeline/case-normalise-*): encode and decode whole, in
temporal chunks and in spatial tiles within 1e-4 of the reference (its own fp32-vs-fp64 gap is ~5e-6); the
pipelines' latent normalisation bit for bit; frames to uint8 exactly."""

from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file

from pyraflow.interop import load_vae
from pyraflow.interop.vae import CausalVideoVAE, check_frame_count, denormalise, normalise, to_uint8

FIXTURES = Path(__file__).parent.parent / "fixtures" / "pyramid-flow-pipeline"
TOLERANCE = 1e-4


def recorded(name: str, folder: str = "vae") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(FIXTURES / folder / f"case-{name}.safetensors")).items()}


@pytest.fixture(scope="module")
def vae():
    return load_vae(FIXTURES / "vae" / "model")


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    return ours.shape == reference.shape and (ours - reference).abs().max().item() < TOLERANCE


def test_an_image_encodes_to_the_references_posterior(vae, parity):
    case = recorded("image-encode")
    moments = vae.moments(case["input.x"])
    mean, logvar = vae.encode(case["input.x"])
    parity("vae encode image: moments", moments, case["output.moments"], TOLERANCE)
    parity("vae encode image: mean", mean, case["output.mean"], TOLERANCE)
    parity("vae encode image: logvar", logvar, case["output.logvar"], TOLERANCE)


@pytest.mark.parametrize("window, key", [(None, "plain"), (16, "chunk16"), (8, "chunk8")])
def test_a_clip_encodes_whole_or_in_chunks_as_the_reference_does(vae, window, key, parity):
    case = recorded("video-encode")
    mean, logvar = vae.encode(case["input.x"], window=window)
    parity(f"vae encode clip {key}: mean", mean, case[f"output.{key}.mean"], TOLERANCE)
    parity(f"vae encode clip {key}: logvar", logvar, case[f"output.{key}.logvar"], TOLERANCE)


@pytest.mark.parametrize("window, key", [(None, "plain"), (2, "chunk2"), (1, "chunk1")])
def test_latents_decode_whole_or_in_chunks_as_the_reference_does(vae, window, key, parity):
    case = recorded("decode")
    parity(f"vae decode {key}", vae.decode(case["input.z"], window=window), case[f"output.{key}"], TOLERANCE)


def test_tiles_blend_as_the_reference_blends_them(vae, parity):
    case = recorded("tiled")
    mean, logvar = vae.encode(case["input.x"], tile=32)
    parity("vae encode tiled: mean", mean, case["output.encode.mean"], TOLERANCE)
    parity("vae encode tiled: logvar", logvar, case["output.encode.logvar"], TOLERANCE)
    parity("vae decode tiled + chunked", vae.decode(case["input.z"], window=1, tile=32), case["output.decode_chunked"],
           TOLERANCE)
    # tiles change the result (the overlap is blended, not recomputed): the test above is not the untiled path
    assert not close(vae.decode(case["input.z"], window=1), case["output.decode_chunked"])


def test_chunks_are_the_first_window_plus_one_then_windows():
    assert CausalVideoVAE._chunks(17, 8) == [(0, 9), (9, 17)]
    assert CausalVideoVAE._chunks(4, 1) == [(0, 2), (2, 3), (3, 4)]
    assert CausalVideoVAE._chunks(17, 16) == [(0, 17)]


@pytest.mark.parametrize("arch, name, folder", [("flux", "flux", "pyramid-flow-miniflux-tiny"),
                                                ("mmdit-sd3", "sd3", "pyramid-flow-sd3-tiny")])
def test_the_pipelines_normalisation_and_frames(arch, name, folder, parity):
    """A released folder's VAE (its causal_video_vae/), the model's latent normalisation and its inverse bit for bit,
    and decoded frames to uint8 as the reference converts them (chunked one latent frame at a time)."""
    case = recorded(f"normalise-{name}", "pipeline")
    vae = load_vae(FIXTURES / "released" / folder)
    for kind in ("video", "image"):
        assert torch.equal(normalise(case[f"{kind}.latent"], arch), case[f"{kind}.normalised"]), kind
        assert torch.equal(denormalise(case[f"{kind}.normalised"], arch), case[f"{kind}.vae_input"]), kind
        parity(f"released {name} vae: {kind} posterior mean", vae.encode(case[f"input.{kind}"])[0],
               case[f"{kind}.posterior_mean"], TOLERANCE)
        decoded = vae.decode(case[f"{kind}.vae_input"], window=1)
        parity(f"released {name} vae: {kind} decoded", decoded, case[f"{kind}.decoded"], TOLERANCE)
        assert torch.equal(rearrange(to_uint8(decoded), "b c t h w -> (b t) h w c"), case[f"{kind}.frames"])


def test_bad_inputs_are_named(vae, tmp_path):
    with pytest.raises(ValueError, match="1 \\+ 8k frames; this clip has 4: cut it to 1 or 9 frames"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="has 120: cut it to 113 or 121 frames"):  # 5 s at 24 fps, one frame short
        check_frame_count(120)
    assert check_frame_count(121) == 16 and check_frame_count(1) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 9, 16, 16), window=4)
    with pytest.raises(ValueError, match="multiple of 32"):
        vae.decode(torch.zeros(1, 16, 1, 4, 4), tile=48)
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="not CausalVideoVAE"):
        load_vae(tmp_path)
