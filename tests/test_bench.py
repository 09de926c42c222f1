"""pyraflow bench runs and reports its documented keys (speed itself is a benchmark figure, not a test)."""

import json

import pytest

from pyraflow.bench import TrainStep, VARIANTS, standard_batch, standard_model_config, training_flops
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
    for name in ("grouped", "reference"):
        assert {"ms_per_step", "visual_tokens_per_s", "peak_mem_mb", "precision"} <= set(result["backends"][name])
    for name in ("pyraflow", "reference_columns", "padded", "per_stage"):
        assert {"ms_per_step", "visual_tokens_per_s", "peak_mem_mb", "precision"} <= set(result["throughput"][name])
    assert result["machine"]["cores"] >= 1
    assert {"fp32_peak_gflops", "bf16_peak_gflops", "fraction_of_fp32_peak", "wide"} <= set(result["mfu"])
    assert {"pyramid_s", "flat_s", "ratio", "pyramid_stage_s"} <= set(result["sampling"])
    assert {"tokens_cv", "peak_mem_range_frac", "fixed_batch"} <= set(result["stability"])
    assert {"cached_s", "recomputed_s", "speedup", "last_unit_speedup"} <= set(result["history_cache"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_layout_carries_the_same_samples(variant):
    import torch

    step = TrainStep(variant, "fp32", torch.device("cpu"))
    real = sum(min(b.layout.visual_lengths[i], 256) for b in step.batches for i in range(b.layout.num_segments))
    assert sum(b.layout.num_segments for b in step.batches) == 16
    assert real == 1600 or variant == "padded"  # padded carries 16 x 256 visual tokens for the same 16 samples
    assert step() > 0


def test_stability_separates_token_budgets_from_fixed_batches():
    from pyraflow.bench import stability

    result = stability(steps=120)
    assert result["tokens_cv"] < 0.02 and result["peak_mem_range_frac"] < 0.1
    assert result["fixed_batch"]["tokens_cv"] > 2 * result["tokens_cv"]


def test_the_quick_pieces_of_the_bench_run_and_report_their_keys():
    """Cheap sizes of the bench's own measurement functions (the full bench is the slow test above)."""
    import torch

    from pyraflow.bench import history_cache_comparison, wide_mfu

    wide = wide_mfu(torch.device("cpu"), peak_fp32=100.0, steps=1)
    assert wide["ms_per_step"] > 0 and wide["fraction_of_fp32_peak"] > 0
    cache = history_cache_comparison(torch.device("cpu"), videos=1, units=2, steps=1, repeats=1)
    assert len(cache["cached_unit_s"]) == len(cache["recomputed_unit_s"]) == 3
    assert cache["speedup"] > 0 and cache["latent"] == [4, 5, 32, 32]
