"""The whole fine-tune of a released folder with pyraflow alone, on the tiny released-style folder: raw clips ->
``pyraflow prepare --layout pyramid-flow`` (its VAE and text encoders) -> a LoRA fine-tune of its video transformer
-> an MP4 sampled from the fine-tune with the folder's encoders and VAE -> the adapters merged and exported as a
released transformer."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pyraflow.cli import main
from pyraflow.config import to_yaml
from pyraflow.sample.released import released_config

RELEASED = Path(__file__).parent / "fixtures" / "pyramid-flow-pipeline" / "released" / "pyramid-flow-miniflux-tiny"
VARIANT = "diffusion_transformer_384p"


def write_clip(path: Path, frames: int, colour: tuple[int, int, int], size: int = 64) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.zeros((size, size, 3), dtype=np.uint8)
            array[:, : 4 + 6 * i] = colour  # a bar sweeping right
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    write_clip(folder / "red.mp4", 9, (220, 30, 30))
    write_clip(folder / "blue.mp4", 12, (30, 30, 220))  # 9 frames used: one clip of 1 + 8
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "red.mp4", "caption": "a red bar sweeping right"}) + "\n"
                                           + json.dumps({"file": "blue.mp4", "caption": "a blue bar"}) + "\n")
    return folder


def test_prepare_fine_tune_sample_and_export_a_released_folder(tmp_path, clips):
    config = tmp_path / "released.yaml"
    config.write_text(to_yaml(released_config(RELEASED, VARIANT, frames=2)))
    data = ["data.dataset=video-folder", f"data.path={clips}", "data.frames=2", "data.image_size=64", "data.resize=crop",
            "data.max_bad_fraction=0.5"]
    extracted = tmp_path / "extracted"
    prepare = ["prepare", "--config", str(config), "--layout", "pyramid-flow", "--out", str(extracted), "--device", "cpu"]
    assert main(prepare + [arg for item in data for arg in ("--set", item)]) == 0
    rows = [json.loads(line) for line in (extracted / "annotation.jsonl").read_text().splitlines()]
    assert sorted(row["text"] for row in rows) == ["a blue bar", "a red bar sweeping right"]  # broken.mp4 skipped
    assert all(row["frames"] == list(range(9)) for row in rows)
    latent = torch.load(extracted / rows[0]["latent"])
    assert latent.shape == (1, 16, 2, 8, 8)  # 1 + 8 frames -> 2 latent frames, 64 px -> 8
    features = torch.load(extracted / rows[0]["text_fea"])
    assert set(features) == {"prompt_embed", "prompt_attention_mask", "pooled_prompt_embed"}
    # resumable: a rerun keeps what is written and makes only what is missing
    kept = extracted / rows[1]["latent"]
    written = kept.stat().st_mtime_ns
    (extracted / rows[0]["latent"]).unlink()
    assert main(prepare + [arg for item in data for arg in ("--set", item)]) == 0
    assert kept.stat().st_mtime_ns == written and torch.equal(torch.load(extracted / rows[0]["latent"]), latent)

    run = tmp_path / "run"
    train = ["data.dataset=pyramid-flow", f"data.path={extracted / 'annotation.jsonl'}", "data.workers=0",
             f"train.init_from={RELEASED / VARIANT}", "train.lora.rank=4", "train.lora.alpha=8", "train.lr=1e-2",
             "train.steps=3", "train.warmup_steps=1", "train.checkpoint_every=3", "train.sample_every=0",
             "train.log_every=1", "batching.token_budget=400", "video.history_noise=0",
             "sample.steps=[1, 1, 1]", "sample.per_prompt=1"]
    assert main(["train", "--config", str(config), "--out", str(run), "--quiet"]
                + [arg for item in train for arg in ("--set", item)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    assert any((run / "samples").glob("*.png"))  # the run's closing grid, decoded by the folder's VAE

    video = tmp_path / "fine-tune.mp4"
    assert main(["sample", "--checkpoint", str(RELEASED), "--transformer", str(run), "--prompt", "a red bar",
                 "--frames", "2", "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu",
                 "--out", str(video)]) == 0
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9

    export = tmp_path / "export"
    assert main(["convert", "--to", "pyramid-flow", str(run), "--merge-lora", "--out", str(export)]) == 0
    merged = load_file(str(export / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(RELEASED / VARIANT / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapters were folded in
    assert json.loads((export / "config.json").read_text())["_class_name"] == "PyramidFluxTransformer"
