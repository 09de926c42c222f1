"""pyraflow bench runs and reports its documented keys (speed itself is a benchmark figure, not a test)."""

import json

import pytest

from pyraflow.bench import ROW_ORDER, TrainStep, VARIANTS, standard_batch, standard_model_config, training_flops
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
    assert main(["bench", "--json", "--steps", "1", "--warmup", "1", "--scales", "1"]) == 0
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
    assert {"pyraflow", "reference_columns", "per_stage", "row_tokens"} <= set(result["scaling"]["scales"]["1"])


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


def test_the_reference_rows_compute_what_the_packed_layout_computes():
    """The row layout (row order, dense row masks, per-token modulation) is the same model on the same samples:
    per sample, its outputs equal those of the same samples (padded text) packed in signature order."""
    import torch

    from pyraflow.packing import unpack

    rows = TrainStep("reference_columns", "fp32", torch.device("cpu"))
    lay = rows.batch.layout
    assert [lay.stages[b] for b in range(16)] == [0, 1, 1, 2] * 4 and rows.contexts[0].plan.rows == 4
    packed = standard_batch(pad_text=True)
    with torch.no_grad():
        for layer in rows.model.modules():  # non-zero modulation and output, so every path shows in the output
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=0.05)
        out_rows = unpack(rows.model(rows.batch, rows.contexts[0]), lay)
        out_packed = unpack(rows.model(packed), packed.layout)
    for k, i in enumerate(ROW_ORDER):  # packed row position k holds standard sample i
        torch.testing.assert_close(out_rows[k], out_packed[i], rtol=1e-4, atol=1e-4)  # fp32 order: ~3e-6 seen
    assert out_rows[0].abs().mean() > 1e-2


def test_scaling_comparison_reports_each_scale():
    import torch

    from pyraflow.bench import scaling_comparison, standard_samples

    assert sum(s.latent[0].numel() // 4 for s in standard_samples(scale=2)) == 6400  # 4x the tokens at scale 2
    result = scaling_comparison(torch.device("cpu"), [1], {}, steps=1, warmup=0, progress=False)
    entry = result["scales"]["1"]
    assert entry["visual_tokens"] == 1600 and entry["row_tokens"] == 4 * 32 + 400
    assert entry["gflop_per_step"] == pytest.approx(training_flops(standard_batch(), standard_model_config()) / 1e9)
    assert entry["reference_columns"]["ms_per_step"] > 0 and entry["per_stage"]["visual_tokens_per_s"] > 0
