"""Loaders on small generated files, including bad ones; the bundled MNIST digits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pyraflow.config import DataConfig
from pyraflow.data.datasets import ImageFolder, MnistDigits, caption_for_digit, check_bad_files, fit_image, iterate_samples
from pyraflow.data.sources import build_dataset, planned_size
from helpers import make_images


def test_fit_image_crops_or_pads_to_the_configured_size():
    image = Image.fromarray(np.full((30, 40, 3), 255, dtype=np.uint8))
    crop = fit_image(image, 16, 3, "crop")
    assert crop.shape == (3, 16, 16) and torch.allclose(crop, torch.ones_like(crop))
    pad = fit_image(image, 64, 1, "pad")
    assert pad.shape == (1, 64, 64)
    assert pad[0, 32, 32] == 1.0 and pad[0, 0, 0] == -1.0  # original centred, black border


def test_image_folder_with_captions_corrupt_file_and_missing_caption(tmp_path, caplog):
    folder = make_images(tmp_path / "images", n=4)
    (folder / "img0.txt").write_text("a noisy square\n")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "img1.png", "caption": "from the manifest"}) + "\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    config = DataConfig(dataset="image-folder", path=str(folder), image_size=16, channels=3, resize="crop",
                        max_bad_fraction=0.5)
    dataset = build_dataset(config)
    samples = list(iterate_samples(dataset))
    assert len(samples) == 4 and len(dataset.bad) == 1 and "broken.png" in dataset.bad[0][0]
    captions = {s.id: s.caption for s in samples}
    assert captions["img0.png"] == "a noisy square"
    assert captions["img1.png"] == "from the manifest"
    assert captions["img2.png"] == ""  # missing caption: empty, with a warning
    assert "no caption" in caplog.text
    assert all(s.pixels.shape == (3, 1, 16, 16) for s in samples)
    check_bad_files(dataset, len(samples), config)  # 1 of 5 bad: under the threshold


def test_mostly_bad_or_empty_folders_are_errors(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.jpg").write_bytes(b"garbage")
    make_images(folder, n=1)
    config = DataConfig(dataset="image-folder", path=str(folder), image_size=8, channels=3)
    dataset = ImageFolder(config)
    samples = list(iterate_samples(dataset))
    with pytest.raises(ValueError, match="3 of 4 files could not be read"):
        check_bad_files(dataset, len(samples), config)
    empty = tmp_path / "empty"
    empty.mkdir()
    config = DataConfig(dataset="image-folder", path=str(empty), image_size=8, channels=3)
    with pytest.raises(ValueError, match="no readable samples"):
        check_bad_files(ImageFolder(config), 0, config)
    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolder(DataConfig(dataset="image-folder", path=str(tmp_path / "nope")))
    (empty / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        ImageFolder(DataConfig(dataset="image-folder", path=str(empty)))


def write_video(path, frames=12, size=32):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.full((size, size, 3), (i * 20) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_folder_cuts_clips_and_skips_a_truncated_video(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "good.mp4", frames=12)
    (folder / "good.txt").write_text("a fading square")
    write_video(folder / "cut.mp4", frames=12)
    data = (folder / "cut.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 5])  # truncated
    config = DataConfig(dataset="video-folder", path=str(folder), image_size=16, channels=3, resize="crop",
                        frames=4, frame_stride=1, max_bad_fraction=0.6)
    dataset = build_dataset(config)
    clips = list(iterate_samples(dataset))
    good = [c for c in clips if c.id.startswith("good")]
    assert len(good) == 3 and all(c.pixels.shape == (3, 4, 16, 16) for c in good)
    assert good[0].caption == "a fading square"
    assert any("cut.mp4" in path for path, _ in dataset.bad)


def test_bundled_clips_decode():
    config = DataConfig(dataset="clips", image_size=16, channels=3, resize="crop", frames=4, frame_stride=4)
    first = next(iterate_samples(build_dataset(config)))
    assert first.pixels.shape == (3, 4, 16, 16) and first.caption


def test_mnist_splits_and_captions():
    config = DataConfig()
    train, heldout = MnistDigits(config, "train"), MnistDigits(config, "heldout")
    assert len(train) == 4500 and len(heldout) == 500
    assert np.bincount(train.labels).tolist() == [450] * 10
    sample = heldout[123]
    assert sample.pixels.shape == (1, 1, 32, 32)
    assert sample.caption == caption_for_digit(sample.label) and sample.caption.startswith("a handwritten digit")
    assert sample.pixels.min() == -1.0 and sample.pixels.max() > 0.9
    assert planned_size(config) == 4500


def test_bad_data_configs():
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(dataset="image-folder")
    with pytest.raises(ValueError, match="unknown"):
        DataConfig(dataset="cifar")
    with pytest.raises(ValueError, match="channels"):
        DataConfig(channels=2)


def test_planned_size_counts_clips_and_images(tmp_path):
    folder = make_images(tmp_path / "images", n=3)
    assert planned_size(DataConfig(dataset="image-folder", path=str(folder))) == 3
    assert planned_size(DataConfig(dataset="image-folder", path=str(folder), num_samples=10)) == 10
    clips = DataConfig(dataset="clips", image_size=8, channels=3, resize="crop", frames=8, frame_stride=4)
    assert planned_size(clips) == 132 // 32 + 250 // 32 + 120 // 32  # non-overlapping clips of 32 frames
