"""pyraflow prepare: round trip row by row, compact text, resume after an interruption, refusal of a mismatched or
older cache, and shards damaged on disk skipped while the rest is read."""

import dataclasses
import json
import logging

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


def prepared(setup, monkeypatch, **changes):
    config, text, latent, out = setup
    config = dataclasses.replace(config, **changes)
    monkeypatch.setattr(cache, "SHARD_SIZE", 3)
    encoded = []
    real = cache.encode_samples
    monkeypatch.setattr(cache, "encode_samples", lambda *a, **k: encoded.append(real(*a, **k)) or encoded[-1])
    result = cache.prepare(config, out, text, latent, progress=False)
    joined = {key: torch.cat([e[key] for e in encoded]) for key in encoded[0]}
    return config, result, joined


def test_every_row_reads_back_exactly_what_was_encoded(setup, monkeypatch):
    config, result, encoded = prepared(setup, monkeypatch)
    _, text, latent, out = setup
    assert result["samples"] == 7 and result["shards"] == 3 and result["written"] == 7
    loaded = cache.load_cache(out, config, text.identity, latent.identity, (3, 1, 8, 8))
    assert len(loaded) == 7 and not loaded.bad_shards
    for i in range(7):
        assert torch.equal(loaded.latent(i), encoded["latents"][i])
        tokens, pooled = loaded.text(i)
        n = int(encoded["text_lengths"][i])
        assert torch.equal(tokens, encoded["text_tokens"][i, :n]) and torch.equal(pooled, encoded["pooled"][i])
    assert loaded.first_captions(10) == ["picture number 0", "picture number 1", "picture number 2"]
    # and it agrees with encoding the dataset in one go (text batches differ, so up to float rounding)
    direct = encode_dataset(config, text, latent)
    for i in range(7):
        assert torch.equal(loaded.latent(i), direct.latent(i))
        torch.testing.assert_close(loaded.text(i)[0], direct.text(i)[0], rtol=1e-5, atol=1e-5)
    rows = [json.loads(line) for line in (out / "shard-00000.jsonl").read_text().splitlines()]
    assert rows[0]["latent_shape"] == [3, 1, 8, 8] and rows[0]["source"].endswith("img0.png")
    # text is stored without padding: as many rows as real tokens
    header = cache.read_header(out / "shard-00000.safetensors")
    assert header["text_tokens"].shape[0] == int(encoded["text_lengths"][:3].sum()) < 3 * 8


def test_bfloat16_text_halves_the_bytes_and_rounds_only_the_text(setup, monkeypatch):
    config, _, encoded = prepared(setup, monkeypatch, text_dtype="bfloat16")
    _, text, latent, out = setup
    loaded = cache.load_cache(out, config, text.identity, latent.identity)
    assert cache.read_header(out / "shard-00000.safetensors")["text_tokens"].dtype == torch.bfloat16
    for i in range(7):
        n = int(encoded["text_lengths"][i])
        tokens = loaded.text(i)[0]
        assert tokens.dtype == torch.float32
        assert torch.equal(tokens, encoded["text_tokens"][i, :n].bfloat16().float())
        assert torch.equal(loaded.latent(i), encoded["latents"][i])  # latents are kept exact
    with pytest.raises(ValueError, match="text_dtype: cache has 'bfloat16', config wants 'float32'"):
        cache.load_cache(out, dataclasses.replace(config, text_dtype="float32"), text.identity, latent.identity)


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


def test_a_cache_from_another_encoder_shape_or_layout_is_refused(setup):
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
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ValueError, match="layout version 1, this pyraflow reads version 2.*prepare it again"):
        cache.load_cache(out, config, text.identity, latent.identity)


def test_damaged_shards_are_skipped_counted_and_logged(setup, monkeypatch, caplog):
    config, _, encoded = prepared(setup, monkeypatch)
    _, text, latent, out = setup
    truncated = out / "shard-00001.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    garbled = out / "shard-00002.safetensors"
    garbled.write_bytes(b"\xff" * 40)
    with caplog.at_level(logging.WARNING, logger="pyraflow.data"):
        loaded = cache.load_cache(out, config, text.identity, latent.identity)
    assert len(loaded) == 3 and loaded.skipped_samples == 3 + 1 and len(loaded.bad_shards) == 2
    assert "shard-00001.safetensors" in caplog.text and "shard-00002.safetensors" in caplog.text
    for i in range(3):  # the sound shard still reads exactly
        assert torch.equal(loaded.latent(i), encoded["latents"][i])
    (out / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="no readable shard"):
        cache.load_cache(out, config, text.identity, latent.identity)
