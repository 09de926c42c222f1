"""pyraflow bench runs and reports its documented keys (speed itself is a benchmark figure, not a test)."""

import json

import pytest

from pyraflow.bench import standard_batch, training_flops, standard_model_config
from pyraflow.cli import main


def test_standard_batch_is_the_documented_one():
    batch = standard_batch()
    assert batch.layout.num_visual == 1600
    assert sorted(batch.layout.stages) == [0] * 4 + [1] * 8 + [2] * 4
    assert all(16 <= n <= 32 for n in batch.layout.text_lengths)
    # the FLOP count by hand for one segment: linear layers 2 * 12 * 256^2 per token, attention 4 * L^2 * 256
    flops = training_flops(batch, standard_model_config())
    tokens = batch.layout.num_text + 1600
    attention = sum(4 * (t + v) ** 2 * 256 for t, v in zip(batch.layout.text_lengths, batch.layout.visual_lengths))
    assert flops == pytest.approx(3 * 4 * (tokens * 2 * 12 * 256**2 + attention))


@pytest.mark.slow
def test_bench_json_has_every_variant(capsys):
    assert main(["bench", "--json", "--steps", "1", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("grouped", "reference", "grouped_per_token_modulation"):
        entry = result["backends"][name]
        assert {"ms_per_step", "visual_tokens_per_s", "peak_mem_mb", "precision"} <= set(entry)
    assert result["machine"]["cores"] >= 1
    assert {"fp32_peak_gflops", "bf16_peak_gflops", "fraction_of_fp32_peak"} <= set(result["mfu"])
    assert {"pyramid_s", "flat_s", "ratio", "pyramid_stage_s"} <= set(result["sampling"])
