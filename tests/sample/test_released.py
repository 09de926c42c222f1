"""Sampling a released folder (pyraflow.sample.released) against the reference's whole text-to-image generation on
its tiny released folders (tests/fixtures/pyramid-flow-pipeline/pipeline/case-t2i-*): with the reference's recorded
starting noise and block noise injected, every DiT input, every stage's end, the decoded picture and its uint8
frames agree within fp32 noise (the reference's own fp32-vs-fp64 gap is ~1e-5)."""

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file

import pyraflow.schedule
from PIL import Image
from pyraflow.cli import main
from pyraflow.interop.vae import to_uint8
from pyraflow.sample.released import NEGATIVE_PROMPT, PROMPT_SUFFIX, is_released_root, load_released, released_config

FIXTURES = Path(__file__).parent.parent / "fixtures" / "pyramid-flow-pipeline"
RELEASED = {"flux": FIXTURES / "released" / "pyramid-flow-miniflux-tiny",
            "sd3": FIXTURES / "released" / "pyramid-flow-sd3-tiny"}
TOLERANCE = 1e-4


def recorded(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    case = json.loads((FIXTURES / "pipeline" / f"case-{name}.json").read_text())
    tensors = {k: v.clone() for k, v in load_file(str(FIXTURES / "pipeline" / f"case-{name}.safetensors")).items()}
    return case, tensors


def gap(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return (ours - reference).abs().max().item()


def generate(pipe, t: dict, monkeypatch, prompt: str = "a cat sitting on a chair", units: int = 1):
    """The pipeline's generation from the reference's recorded noise: (the timestep of every DiT call, each
    (unit, stage)'s end latents, the pixels)."""
    block_noise = [t[f"unit{u}.stage{k}.block_noise"] for u in range(units) for k in (1, 2)]  # in the jumps' order
    monkeypatch.setattr(pyraflow.schedule, "block_noise", lambda shape, *args, **kwargs: block_noise.pop(0))
    timesteps, ends = [], []
    forward = type(pipe.model).forward
    monkeypatch.setattr(pipe.model, "forward", lambda batch, *a, **k: timesteps.append(batch.timestep.max().item())
                        or forward(pipe.model, batch, *a, **k))
    pixels, _ = pipe.generate([prompt], noise=t["input.init_noise"], size=(64, 64),
                              on_stage_end=lambda k, x: ends.append(x.clone()))
    assert not block_noise  # every jump took the reference's noise
    return timesteps, ends, pixels


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_text_to_image_follows_the_reference_stage_by_stage(kind, monkeypatch, parity):
    case, t = recorded(f"t2i-{kind}")
    variant = case["description"].split("model_variant='")[1].split("'")[0]
    steps = [2, 2, 2]
    pipe = load_released(RELEASED[kind], variant, device="cpu", frames=1, steps=steps, guidance=9.0)
    assert case["prompt_as_encoded"] == "a cat sitting on a chair" + PROMPT_SUFFIX
    assert case["negative_prompt_as_encoded"] == NEGATIVE_PROMPT

    timesteps, ends, pixels = generate(pipe, t, monkeypatch)
    for k in range(3):
        expected = [t[f"unit0.stage{k}.step{i}.timestep"][0].item() for i in range(steps[k])]
        assert timesteps[2 * k : 2 * k + 2] == pytest.approx(expected, abs=1e-4), k
        parity(f"text-to-image {kind}: stage {k} end", ends[k], t[f"unit0.stage{k}.latents_out"], TOLERANCE)
    parity(f"text-to-image {kind}: decoded picture", pixels, t["output.video"].clamp(-1, 1), TOLERANCE)
    frames = to_uint8(rearrange(pixels, "b c t h w -> (b t) h w c"))
    parity(f"text-to-image {kind}: uint8 frames", frames.int(), t["output.frames"].int(), 1.5)

    # the tolerance catches a plausible slip: the prompt encoded without the reference's suffix
    pipe.config.sample.prompt_suffix = ""
    _, slipped, _ = generate(pipe, t, monkeypatch)
    assert gap(slipped[0], t["unit0.stage0.latents_out"]) > 10 * TOLERANCE


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_text_to_video_follows_the_reference_unit_by_unit(kind, monkeypatch, parity):
    """Two latent frames (9 video frames): the first frame with guidance 7, then a unit conditioned on it (the
    history at every stage) with video guidance 5."""
    case, t = recorded(f"t2v-{kind}")
    steps = [2, 2, 2]
    pipe = load_released(RELEASED[kind], "diffusion_transformer_384p", device="cpu", frames=2, steps=steps,
                         guidance=7.0, video_guidance=5.0)
    timesteps, ends, pixels = generate(pipe, t, monkeypatch, "a red fox running through the snow", units=2)
    assert len(ends) == 6
    for u in range(2):
        for k in range(3):
            expected = [t[f"unit{u}.stage{k}.step{i}.timestep"][0].item() for i in range(steps[k])]
            assert timesteps[6 * u + 2 * k : 6 * u + 2 * k + 2] == pytest.approx(expected, abs=1e-4), (u, k)
            parity(f"text-to-video {kind}: unit {u} stage {k} end", ends[3 * u + k], t[f"unit{u}.stage{k}.latents_out"],
                   TOLERANCE)
    assert pixels.shape == (1, 3, 9, 64, 64)
    parity(f"text-to-video {kind}: decoded video", pixels, t["output.video"].clamp(-1, 1), TOLERANCE)
    frames = to_uint8(rearrange(pixels, "b c t h w -> (b t) h w c"))
    parity(f"text-to-video {kind}: uint8 frames", frames.int(), t["output.frames"].int(), 1.5)

    # the later unit's guidance is the video guidance: with the first frame's it ends elsewhere
    pipe.config.sample.video_guidance = 7.0
    _, slipped, _ = generate(pipe, t, monkeypatch, "a red fox running through the snow", units=2)
    assert gap(slipped[0], t["unit0.stage0.latents_out"]) < TOLERANCE
    assert gap(slipped[3], t["unit1.stage0.latents_out"]) > 10 * TOLERANCE


def test_pyraflow_sample_draws_from_a_released_folder(tmp_path):
    out = tmp_path / "cat.png"
    assert main(["sample", "--checkpoint", str(RELEASED["flux"]), "--prompt", "a cat", "--num", "2", "--steps", "1",
                 "--height", "64", "--width", "128", "--device", "cpu", "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert width >= 2 * 128 and 64 <= height < 128  # one row of two 64 x 128 pictures


def test_pyraflow_sample_makes_a_video_and_an_image_to_video_from_a_released_folder(tmp_path):
    """The folder's video transformer, 2 latent frames -> 9 video frames; then the same from a first frame."""
    out = tmp_path / "fox.gif"
    common = ["sample", "--checkpoint", str(RELEASED["sd3"]), "--prompt", "a fox", "--frames", "2", "--steps", "1",
              "--height", "64", "--width", "64", "--device", "cpu"]
    assert main(common + ["--out", str(out)]) == 0
    assert Image.open(out).n_frames == 9
    video_frames = [arg for arg in common if arg not in ("--frames", "2")] + ["--out", str(tmp_path / "v.gif")]
    assert main(video_frames + ["--video-frames", "9"]) == 0 and Image.open(tmp_path / "v.gif").n_frames == 9
    first = tmp_path / "first.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(first)
    memory = ["--variant", "diffusion_transformer_384p", "--precision", "bf16", "--offload", "--decode-window", "1",
              "--decode-tile", "256"]
    assert main(common + memory + ["--image", str(first), "--out", str(tmp_path / "i2v.gif")]) == 0
    red = Image.open(tmp_path / "i2v.gif").convert("RGB").getpixel((128, 128))  # inside the 4x enlarged frame
    assert red[0] > 150 and red[1] < 80  # frame 0 is the given picture


def test_a_fine_tune_samples_with_the_folders_encoders_and_vae(tmp_path):
    """A pyraflow model directory of the folder's own transformer in its place gives the folder's own pictures;
    a transformer of the other kind is refused, naming the field."""
    from pyraflow.convert import import_reference

    import_reference(RELEASED["flux"] / "diffusion_transformer_image", tmp_path / "ft")
    kwargs = dict(device="cpu", steps=[1, 1, 1])
    own, _ = load_released(RELEASED["flux"], **kwargs).generate(["a cat"], seed=3, size=(64, 64))
    swapped, _ = load_released(RELEASED["flux"], transformer=tmp_path / "ft", **kwargs).generate(["a cat"], seed=3,
                                                                                                 size=(64, 64))
    assert torch.equal(own, swapped)
    import_reference(RELEASED["sd3"] / "diffusion_transformer_384p", tmp_path / "sd3")
    with pytest.raises(ValueError, match="another architecture than model: \\(arch: 'mmdit-sd3' there, 'flux' here"):
        load_released(RELEASED["flux"], transformer=tmp_path / "sd3", **kwargs)


def test_a_folder_that_is_not_released_is_refused_with_the_fix(tmp_path):
    assert is_released_root(RELEASED["flux"]) and not is_released_root(tmp_path)
    with pytest.raises(ValueError, match="not a released Pyramid Flow folder"):
        released_config(tmp_path)
    with pytest.raises(ValueError, match="has no diffusion_transformer_image/ transformer; it has diffusion_transformer_384p"):
        released_config(RELEASED["sd3"], "diffusion_transformer_image")


def test_offload_moves_each_part_to_the_device_only_for_its_turn(monkeypatch):
    """Text encoders, then the transformer (every DiT call inside its turn), then the VAE: each moved on and back
    off, never two at once; the pixels are those of the pipeline that keeps everything in place."""
    kwargs = dict(device="cpu", steps=[1, 1, 1])
    kept, _ = load_released(RELEASED["flux"], **kwargs).generate(["a cat"], seed=3, size=(64, 64))
    pipe = load_released(RELEASED["flux"], offload=True, **kwargs)
    events = []
    for name, part in (("text", pipe.text_encoder), ("model", pipe.model), ("vae", pipe.latent_space)):
        move = part.to
        monkeypatch.setattr(part, "to", lambda device, name=name, move=move: events.append(name) or move(device))
    forward = type(pipe.model).forward
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: events.append("dit") or forward(pipe.model, *a, **k))
    offloaded, _ = pipe.generate(["a cat"], seed=3, size=(64, 64))
    calls = events.count("dit")
    assert calls >= 3 and events == ["text", "text", "model"] + ["dit"] * calls + ["model", "vae", "vae"]
    assert torch.equal(offloaded, kept)


def test_bf16_holds_every_part_in_bf16_and_stays_near_fp32():
    kwargs = dict(device="cpu", steps=[2, 2, 2])
    full, _ = load_released(RELEASED["sd3"], **kwargs).generate(["a cat"], seed=3, size=(64, 64))
    pipe = load_released(RELEASED["sd3"], precision="bf16", **kwargs)
    parts = [pipe.model, pipe.latent_space.vae] + [model for _, model in (*pipe.text_encoder.encoder.clips,
                                                                          pipe.text_encoder.encoder.t5)]
    assert all(p.dtype == torch.bfloat16 for part in parts for p in part.parameters())
    half, _ = pipe.generate(["a cat"], seed=3, size=(64, 64))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert 0 < (half - full).abs().mean() < 0.05  # bf16 rounding, not another picture


def test_decode_options_are_for_released_folders_only(tmp_path):
    from pyraflow.sample import load_pipeline

    with pytest.raises(ValueError, match="not a released folder"):
        load_pipeline(tmp_path, "cpu", decode_window=1)
    with pytest.raises(ValueError, match="precision 'fp16': use fp32 or bf16"):
        load_released(RELEASED["flux"], device="cpu", precision="fp16")


def test_a_video_length_that_is_not_1_plus_8k_is_refused_naming_the_nearest(tmp_path, capsys):
    args = ["sample", "--checkpoint", str(RELEASED["sd3"]), "--prompt", "a fox", "--video-frames", "120",
            "--out", str(tmp_path / "fox.mp4")]
    assert main(args) == 2
    assert "this clip has 120: cut it to 113 or 121 frames" in capsys.readouterr().err
