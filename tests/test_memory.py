"""Peak memory counted on the meta device (pyraflow.memory), against sums worked out by hand and the VAE decode's
own structure."""

import json
from pathlib import Path

import pytest
import torch

import pyraflow.memory
from pyraflow.cli import main
from pyraflow.memory import LiveBytes, vae_config, vae_decode_memory

TINY = Path(__file__).parent / "fixtures" / "pyramid-flow-pipeline" / "released" / "pyramid-flow-miniflux-tiny"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_live_bytes_follow_allocations_and_frees(device):
    with torch.device(device), LiveBytes() as counter:
        x = torch.ones(1000)  # 4,000 bytes
        y = x * 2  # 8,000 live
        del x  # 4,000
        z = y.view(10, 100)  # a view: nothing new
        z.add_(1)  # in place: nothing new
        w = torch.cat([y, y])  # 8,000 more: 12,000 live, the peak
        del w, y, z
        assert counter.live == 0
    assert counter.peak == 12_000


def test_decode_peaks_fall_with_chunks_and_tiles_and_bf16_halves_them():
    config = vae_config(TINY)
    whole = vae_decode_memory(config, 9, 256, 256, None, None, torch.float32)
    chunked = vae_decode_memory(config, 9, 256, 256, 1, None, torch.float32)
    tiled = vae_decode_memory(config, 9, 256, 256, None, 64, torch.float32)
    half = vae_decode_memory(config, 9, 256, 256, None, None, torch.bfloat16)
    assert whole["frames"] == chunked["frames"] == 65 and whole["output_bytes"] == 3 * 65 * 256 * 256 * 4
    assert chunked["peak_bytes"] < whole["peak_bytes"] / 2 and tiled["peak_bytes"] < whole["peak_bytes"]
    assert whole["peak_bytes"] > 2 * whole["output_bytes"]  # activations of 8+ channels at full size, beyond the output
    assert half["peak_bytes"] * 2 == whole["peak_bytes"] and half["weights_bytes"] * 2 == whole["weights_bytes"]


def test_plan_prints_the_decode_table(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pyraflow.memory, "CLIPS", {"64px": (64, 64)})
    monkeypatch.setattr(pyraflow.memory, "SECONDS", {1: 2})
    assert main(["plan", "--vae-decode", str(TINY), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [row["setting"] for row in table["rows"]] == list(pyraflow.memory.SETTINGS)
    assert all(row["bf16"]["frames"] == 9 for row in table["rows"])
    assert main(["plan", "--vae-decode", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
