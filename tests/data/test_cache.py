"""pyraflow prepare: round trip, resume after an interruption, refusal of a mismatched cache."""

import json

import pytest
import torch

import pyraflow.data.cache as cache
from pyraflow.config import DataConfig, LatentConfig, TextConfig
from pyraflow.data import encode_dataset
from pyraflow.latents import build_latent_space
from pyraflow.storage import partial_path
from pyraflow.text import load_text_encoder
from helpers import make_images


@pytest.fixture()
def setup(tmp_path):
    folder = make_images(tmp_path / "images", n=7)
    for i in range(7):
        (folder / f"img{i}.txt").write_text(f"picture number {i % 3}")
    config = DataConfig(dataset="image-folder", path=str(folder), image_size=8, channels=3, resize="crop")
    return config, load_text_encoder(TextConfig(max_tokens=8)), build_latent_space(LatentConfig()), tmp_path / "cache"


def test_round_trip_returns_exactly_what_was_encoded(setup, monkeypatch):
    config, text, latent, out = setup
    monkeypatch.setattr(cache, "SHARD_SIZE", 3)
    encoded = []
    real = cache.encode_samples
    monkeypatch.setattr(cache, "encode_samples", lambda *a, **k: encoded.append(real(*a, **k)) or encoded[-1])
    result = cache.prepare(config, out, text, latent, progress=False)
    assert result["samples"] == 7 and result["shards"] == 3 and result["written"] == 7
    loaded = cache.load_cache(out, config, text.identity, latent.identity, (3, 1, 8, 8))
    for key in ("latents", "text_tokens", "text_lengths", "pooled"):
        assert torch.equal(getattr(loaded, key), torch.cat([e[key] for e in encoded])), key
    # and it agrees with encoding the dataset in one go (text batches differ, so up to float rounding)
    direct = encode_dataset(config, text, latent)
    assert loaded.ids == direct.ids and loaded.captions == direct.captions
    assert torch.equal(loaded.latents, direct.latents)
    torch.testing.assert_close(loaded.text_tokens, direct.text_tokens, rtol=1e-5, atol=1e-5)
    rows = [json.loads(line) for line in (out / "shard-00000.jsonl").read_text().splitlines()]
    assert rows[0]["latent_shape"] == [3, 1, 8, 8] and rows[0]["source"].endswith("img0.png")


def test_an_interrupted_prepare_resumes(setup, monkeypatch):
    config, text, latent, out = setup
    monkeypatch.setattr(cache, "SHARD_SIZE", 3)
    real = cache.encode_samples
    calls = {"n": 0}

    def crash_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            partial_path(out / "shard-00001.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "encode_samples", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(config, out, text, latent, progress=False)
    assert (out / "shard-00000.jsonl").is_file() and not (out / "complete.json").exists()
    monkeypatch.setattr(cache, "encode_samples", real)
    result = cache.prepare(config, out, text, latent, progress=False)
    assert result["reused"] == 3 and result["written"] == 4
    assert not list(out.glob("*partial*"))
    assert len(cache.load_cache(out, config, text.identity, latent.identity)) == 7


def test_a_cache_from_another_encoder_or_shape_is_refused(setup):
    config, text, latent, out = setup
    cache.prepare(config, out, text, latent, progress=False)
    with pytest.raises(ValueError, match="text_encoder: cache has"):
        cache.load_cache(out, config, "t5:other", latent.identity)
    with pytest.raises(ValueError, match="config wants"):
        cache.prepare(config, out, text, build_latent_space(LatentConfig(scale=0.5)), progress=False)
    with pytest.raises(ValueError, match="shard-00000.safetensors holds latents of shape"):
        cache.load_cache(out, config, text.identity, latent.identity, (4, 1, 8, 8))
    with pytest.raises(ValueError, match="not a finished cache"):
        cache.load_cache(out.parent, config, text.identity, latent.identity)
