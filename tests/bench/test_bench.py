"""pyraflow bench runs and reports its documented keys (speed itself is a benchmark figure, not a test); its
baselines compute what the product computes; its FLOP count agrees with torch's own counter."""

import json
import re

import pytest
import torch

from pyraflow.bench.standard import (ROW_ORDER, VARIANTS, TrainStep, standard_batch, standard_model_config,
                                     standard_samples, training_flops)
from pyraflow.cli import main
from pyraflow.archs.mmdit import MultiStageMMDiT
from pyraflow.packing import pack
from helpers import per_segment_attention

COUNTED = re.compile(r"blocks\.\d+\.(text|visual)\.(qkv|proj|mlp\.\d)$")  # what training_flops counts


def counted_training_flops(model, samples) -> float:
    """3 x the forward FLOPs torch.utils.flop_counter counts in the blocks' linear layers (adaLN modulation left
    out, as training_flops leaves it out) and in SDPA, each sample run alone (so no padding is counted)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query, key, value, *args, **kwargs):
        return sdpa_flop_count(query, key, value)

    total = 0
    for s in samples:
        with FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}) as counter, torch.no_grad():
            model(pack([s], 3, 2, 4, 384, 384))
        counts = counter.get_flop_counts()
        total += sum(sum(ops.values()) for name, ops in counts.items() if COUNTED.search(name))
        total += counts["Global"][torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    return 3 * total


def test_standard_batch_is_the_documented_one_and_its_flops_match_torchs_counter():
    batch = standard_batch()
    assert batch.layout.num_visual == 1600
    assert sorted(batch.layout.stages) == [0] * 4 + [1] * 8 + [2] * 4
    assert all(16 <= n <= 32 for n in batch.layout.text_lengths)
    config = standard_model_config(attention="grouped")
    model = MultiStageMMDiT(config)
    assert training_flops(batch, config) == pytest.approx(counted_training_flops(model, standard_samples()), rel=1e-9)


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
    assert {"mixed", "square", "mixed_cost_per_token"} <= set(result["shapes"])
    assert {"pyraflow", "reference_columns", "per_stage", "row_tokens"} <= set(result["scaling"]["scales"]["1"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_layout_carries_the_same_samples(variant):
    step = TrainStep(variant, "fp32", torch.device("cpu"))
    real = sum(min(b.layout.visual_lengths[i], 256) for b in step.batches for i in range(b.layout.num_segments))
    assert sum(b.layout.num_segments for b in step.batches) == 16
    assert real == 1600 or variant == "padded"  # padded carries 16 x 256 visual tokens for the same 16 samples
    assert step() > 0


def test_stability_separates_token_budgets_from_fixed_batches():
    from pyraflow.bench.speed import stability

    result = stability(steps=120)
    assert result["tokens_cv"] < 0.02 and result["peak_mem_range_frac"] < 0.1
    assert result["fixed_batch"]["tokens_cv"] > 2 * result["tokens_cv"]


def test_the_quick_pieces_of_the_bench_run_and_report_their_keys():
    """Cheap sizes of the bench's own measurement functions (the full bench is the slow test above)."""
    from pyraflow.bench.speed import history_cache_comparison, wide_mfu

    wide = wide_mfu(torch.device("cpu"), peak_fp32=100.0, steps=1)
    assert wide["ms_per_step"] > 0 and wide["fraction_of_fp32_peak"] > 0
    cache = history_cache_comparison(torch.device("cpu"), videos=1, units=2, steps=1, repeats=1)
    assert len(cache["cached_unit_s"]) == len(cache["recomputed_unit_s"]) == 3
    assert cache["speedup"] > 0 and cache["latent"] == [4, 5, 32, 32]


def test_the_reference_rows_compute_what_the_packed_layout_computes():
    """The row layout (row order, dense row masks, per-token modulation) is the same model on the same samples:
    per sample, its outputs equal those of the same samples (padded text) packed in signature order."""
    from pyraflow.packing import unpack

    rows = TrainStep("reference_columns", "fp32", torch.device("cpu"))
    lay = rows.batch.layout
    assert [lay.stages[b] for b in range(16)] == [0, 1, 1, 2] * 4 and rows.contexts[0].attention.rows == 4
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
    from pyraflow.bench.speed import scaling_comparison

    assert sum(s.latent[0].numel() // 4 for s in standard_samples(scale=2)) == 6400  # 4x the tokens at scale 2
    result = scaling_comparison(torch.device("cpu"), [1], {}, steps=1, warmup=0, progress=False)
    entry = result["scales"]["1"]
    assert entry["visual_tokens"] == 1600 and entry["row_tokens"] == 4 * 32 + 400
    assert entry["gflop_per_step"] == pytest.approx(training_flops(standard_batch(), standard_model_config()) / 1e9)
    assert entry["reference_columns"]["ms_per_step"] > 0 and entry["per_stage"]["visual_tokens_per_s"] > 0


def test_the_row_attention_of_the_reference_layout_equals_per_segment_attention():
    from pyraflow.bench.baselines import RowAttention
    from pyraflow.packing import Sample

    g = torch.Generator().manual_seed(7)
    samples = [Sample(stage, torch.randn(3, 1, side, side, generator=g), torch.randn(5, 24, generator=g),
                      torch.randn(12, generator=g), 100.0)
               for _ in range(2) for stage, side in ((0, 4), (1, 8), (1, 8), (2, 16))]
    layout = pack(samples, num_stages=3, keep_order=True).layout  # two rows of [low, mid, mid, high]
    assert layout.order == list(range(8)) and len(layout.groups) == 6  # runs of equal consecutive segments
    n = layout.num_text + layout.num_visual
    q, k, v = (torch.randn(n, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    nt = layout.num_text
    out = torch.cat(RowAttention(layout, 2, torch.device("cpu"))((q[:nt], k[:nt], v[:nt]), (q[nt:], k[nt:], v[nt:])))
    expected = per_segment_attention(q, k, v, layout, False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((expected * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rows must be alike"):
        RowAttention(pack(samples[:4] + samples[4:][::-1], num_stages=3, keep_order=True).layout, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="do not split"):
        RowAttention(layout, 3, torch.device("cpu"))


def test_the_dense_mask_and_per_token_modulation_baselines_compute_what_the_product_computes():
    from pyraflow.bench.baselines import DenseMaskAttention, per_token_modulation
    from helpers import randomised_model, random_samples

    model = randomised_model(13, attention="grouped")
    batch = pack(random_samples(13, count=6, frames=(1, 2)), num_stages=3)
    device = torch.device("cpu")
    with torch.no_grad():
        expected = model(batch)
        context = model.prepare(batch.layout, device)
        context.attention = DenseMaskAttention(batch.layout, False, device)
        torch.testing.assert_close(model(batch, context), expected, rtol=1e-5, atol=1e-5)
        context = per_token_modulation(model.prepare(batch.layout, device), device)
        assert context.visual.index is not None and context.text.index is not None
        torch.testing.assert_close(model(batch, context), expected, rtol=1e-5, atol=1e-5)


def test_the_shape_comparison_times_a_mixed_and_a_square_batch_of_the_same_stages():
    from pyraflow.bench.standard import shaped_samples
    from pyraflow.bench.speed import shape_comparison

    mixed, square = shaped_samples(True), shaped_samples(False)
    assert [s.stage for s in mixed] == [s.stage for s in square] == [0] * 4 + [1] * 8 + [2] * 4
    assert {tuple(s.latent.shape[2:]) for s in mixed if s.stage == 2} == {(40, 24), (32, 32), (24, 40)}
    result = shape_comparison(torch.device("cpu"), "fp32", steps=1, warmup=0, progress=False)
    assert result["mixed"]["groups"] == 9 and result["square"]["groups"] == 3
    assert result["mixed_cost_per_token"] > 0


def test_bench_times_fp32_only_where_the_cpu_has_no_fast_bf16(monkeypatch):
    from pyraflow.bench import standard

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    timed, why = standard.host_precisions(cpu)
    assert timed == ("fp32",) and "AVX2" in why and "emulated" in why
    assert standard.variant_precisions("grouped", cpu) == ("fp32",)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert standard.host_precisions(cpu)[0] == ("fp32", "bf16")
    assert standard.variant_precisions("flash", cpu) == ("bf16",)
