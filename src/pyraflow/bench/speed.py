"""``pyraflow bench``: training-step speed and memory of the packed multi-stage step against other layouts,
MFU, sampling, the video history cache, batch stability, and larger latents (see BENCHMARKS.md for the keys).

Timing alternates the variants round by round in one process (so drift hits all alike) and reports
medians. Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU an exact accounting of
parameters, gradients, AdamW state and the tensors autograd saves for backward (see accounted_memory_mb).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from pyraflow.bench.standard import (BACKEND_VARIANTS, CUDA_VARIANTS, ROWS, SCALING_VARIANTS, STANDARD_STAGES,
                                     THROUGHPUT_VARIANTS, VARIANTS, VISUAL_TOKENS, SavedBytes, TrainStep,
                                     accounted_memory_mb, cuda_peak_memory_mb, host_precisions, machine,
                                     matmul_peak_gflops, standard_batch, standard_model_config, training_flops,
                                     variant_names, variant_precisions)
from pyraflow.compilation import compilations, compile_blocks, reset_compilations, toolchain
from pyraflow.archs.mmdit import MultiStageMMDiT
from pyraflow.packing import PackedBatch, Sample, pack
from pyraflow.train.optim import make_optimizer


def _sampling_fixture(device: torch.device, captions: int, compiled: bool = False, **model_overrides):
    """The standard model (seeded) in eval mode, ``captions`` random 24-token captions and a null caption."""
    from pyraflow.text import TextEmbedding

    torch.manual_seed(0)
    model = MultiStageMMDiT(standard_model_config(attention="auto", **model_overrides)).to(device).eval()
    if compiled:
        compile_blocks(model)
    g = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(captions, 24, 384, generator=g), torch.full((captions,), 24),
                         torch.randn(captions, 384, generator=g))
    null = TextEmbedding(torch.zeros(1, 2, 384), torch.tensor([2]), torch.zeros(1, 384))
    return model, text, null


def sampling_comparison(device: torch.device, images: int = 16, total_steps: int = 30, repeats: int = 2,
                        compiled: bool = False) -> dict:
    """Wall time of 3-stage pyramidal sampling against flat full-resolution flow sampling with the same
    total number of Euler steps and the same model (standard config, 32x32 latents, guidance on);
    alternated, median over ``repeats`` runs each. compiled: the blocks compiled (a first untimed round of each
    pays the compilation)."""
    from pyraflow.config import ScheduleConfig
    from pyraflow.sample import sample_pyramid
    from pyraflow.schedule import PyramidSchedule

    if compiled:
        reset_compilations()
    model, text, null = _sampling_fixture(device, images, compiled)
    result = {"images": images, "total_steps": total_steps, "latent": [4, 1, 32, 32], "repeats": repeats,
              "compiled": compiled}
    runs: dict[str, list[tuple[float, list[float]]]] = {"pyramid": [], "flat": []}
    for round_ in range(repeats + compiled):
        for name, stages in (("pyramid", 3), ("flat", 1)):
            schedule = PyramidSchedule(ScheduleConfig(stages=stages))
            steps = [total_steps // stages] * stages
            start = time.perf_counter()
            _, per_stage = sample_pyramid(model, schedule, text, null, (4, 1, 32, 32), steps, 3.0,
                                          torch.Generator(device=device).manual_seed(1))
            if round_ >= compiled:
                runs[name].append((time.perf_counter() - start, per_stage))
    for name, rs in runs.items():
        result[f"{name}_s"] = statistics.median(t for t, _ in rs)
        result[f"{name}_stage_s"] = [statistics.median(p[k] for _, p in rs) for k in range(len(rs[0][1]))]
    result["ratio"] = result["flat_s"] / result["pyramid_s"]
    return result


def wide_mfu(device: torch.device, peak_fp32: float, steps: int = 5) -> dict:
    """MFU where matmuls dominate: width 384 (6 heads of 64), 8 segments of 256 visual + 24 text tokens."""
    g = torch.Generator().manual_seed(0)
    samples = [Sample(2, torch.randn(4, 1, 32, 32, generator=g), torch.randn(24, 384, generator=g),
                      torch.randn(384, generator=g), 300.0) for _ in range(8)]
    batch = pack(samples, 3, 2, 4, 384, 384).to(device)
    config = standard_model_config(width=384, num_heads=6, attention="auto")
    torch.manual_seed(0)
    model = MultiStageMMDiT(config).to(device)
    optimizer = make_optimizer(list(model.parameters()), 1e-4, 0.0)
    context = model.prepare(batch.layout, device)
    target = torch.randn_like(batch.visual)
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.functional.mse_loss(model(batch, context), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    gflops = training_flops(batch, config) / 1e9 / seconds
    return {"width": 384, "segment_tokens": 280, "segments": 8, "precision": "fp32", "ms_per_step": 1000 * seconds,
            "model_gflops": gflops, "fraction_of_fp32_peak": gflops / peak_fp32}


def history_cache_comparison(device: torch.device, videos: int = 1, unit_frames: int = 2, units: int = 4,
                             steps: int = 8, repeats: int = 2) -> dict:
    """Autoregressive video sampling with the history cache (text and history keys/values computed once per
    unit and stage) against recomputing them at every Euler step, as the reference does. Standard model
    with temporal-causal attention, 32x32 latents, 1 + units * unit_frames frames, guidance on; alternated,
    median over ``repeats`` runs."""
    from pyraflow.config import ScheduleConfig
    from pyraflow.sample import sample_video
    from pyraflow.schedule import PyramidSchedule

    model, text, null = _sampling_fixture(device, videos, temporal_causal=True)
    schedule = PyramidSchedule(ScheduleConfig(stages=3))
    shape = (4, 1 + units * unit_frames, 32, 32)
    runs: dict[str, list[list[float]]] = {"cached": [], "recomputed": []}
    for _ in range(repeats):
        for name in runs:
            _, per_unit = sample_video(model, schedule, text, null, shape, unit_frames, [steps] * 3, 3.0,
                                       torch.Generator(device=device).manual_seed(1), use_cache=name == "cached")
            runs[name].append(per_unit)
    per_unit = {name: [statistics.median(r[u] for r in rs) for u in range(units + 1)] for name, rs in runs.items()}
    total = {name: statistics.median(sum(r) for r in rs) for name, rs in runs.items()}
    return {
        "videos": videos, "latent": list(shape), "unit_frames": unit_frames, "steps_per_stage": steps, "repeats": repeats,
        "cached_s": total["cached"], "recomputed_s": total["recomputed"], "speedup": total["recomputed"] / total["cached"],
        "cached_unit_s": per_unit["cached"], "recomputed_unit_s": per_unit["recomputed"],
        "last_unit_speedup": per_unit["recomputed"][-1] / per_unit["cached"][-1],
    }


def _saved_bytes(model: MultiStageMMDiT, batch: PackedBatch) -> int:
    """Bytes autograd saves for backward in one forward of ``batch``."""
    with SavedBytes(model) as saved:
        model(batch).sum()
    return saved.total


def stability(steps: int = 300, text_tokens: int = 24, compiled_steps: bool = False,
              device: torch.device = torch.device("cpu")) -> dict:
    """Tokens and memory per step over ``steps`` steps while the stage mix moves mid-run (linear from
    50/30/20 at step 100 to 25/50/25 at step 200), for token-budget batches against a fixed 16 samples
    per batch (the reference's way). Memory per step is accounted exactly (parameters, gradients, AdamW
    state, saved activations) for the standard model; it depends only on the per-stage counts, so each
    distinct count vector is measured once. compiled_steps: also count recompilations of compiled blocks over the
    token-budget batches (``recompilations``)."""
    from pyraflow.batching import TokenBudgetBatcher, build_mix
    from pyraflow.config import BatchingConfig, MixConfig

    points = [{"step": 100, "ratio": [0.5, 0.3, 0.2]}, {"step": 200, "ratio": "25-50-25"}]
    segment = [(side // 2) ** 2 + text_tokens for _, side, _ in STANDARD_STAGES]
    torch.manual_seed(0)
    model = MultiStageMMDiT(standard_model_config())
    static = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    memo: dict[tuple[int, ...], float] = {}

    def memory(counts: list[int]) -> float:
        key = tuple(counts)
        if key not in memo:
            samples = [Sample(stage, torch.randn(4, 1, side, side, generator=g), torch.randn(text_tokens, 384, generator=g),
                              torch.randn(384, generator=g), 500.0)
                       for (stage, side, _), n in zip(STANDARD_STAGES, counts) for _ in range(n)]
            memo[key] = (static + _saved_bytes(model, pack(samples, 3, 2, 4, 384, 384))) / 2**20
        return memo[key]

    def run(config: BatchingConfig) -> dict:
        sequence.clear()
        mix = MixConfig(kind="linear", points=points)
        batcher = TokenBudgetBatcher(config, segment, build_mix(mix, 3), 100_000)
        tokens, mem = [], []
        for _ in range(steps):
            batch = batcher.next_batch()
            tokens.append(batch.tokens)
            mem.append(memory(batch.counts))
            sequence.append(list(batch.counts))
        t = torch.tensor(tokens, dtype=torch.float64)
        m = torch.tensor(mem, dtype=torch.float64)
        return {"tokens_mean": float(t.mean()), "tokens_cv": float(t.std(unbiased=False) / t.mean()),
                "peak_mem_mb_mean": float(m.mean()), "peak_mem_mb_min": float(m.min()), "peak_mem_mb_max": float(m.max()),
                "peak_mem_range_frac": float((m.max() - m.min()) / m.mean())}

    sequence: list[list[int]] = []
    budget = sum(n * s for (_, _, n), s in zip(STANDARD_STAGES, segment))  # the standard batch's tokens
    token_budget = run(BatchingConfig(token_budget=budget))
    budget_batches = list(sequence)
    fixed = run(BatchingConfig(token_budget=10**9, max_samples=16, batch_multiple=16))
    out = {"steps": steps, "mix": "50/30/20 until step 100, linear to 25/50/25 at step 200", "token_budget": budget,
           **{k: v for k, v in token_budget.items()}, "fixed_batch": fixed}
    if compiled_steps:
        out["compiled"] = recompilations(budget_batches, device)
    return out


def recompilations(batches: list[list[int]], device: torch.device) -> dict:
    """Compilations of the compiled blocks over a sequence of token-budget batches (per-stage counts; random
    samples, text of 16-32 tokens): training steps of the standard layout on a width-64 model, since what
    recompiles is the shapes and layouts, not the width. Counted from a fresh cache."""
    reset_compilations()
    g = torch.Generator().manual_seed(1)
    step = TrainStep("grouped", "fp32", device, compiled=True, width=64, num_heads=2)
    start = compilations()
    after_first = None
    for counts in tqdm(batches, desc="bench recompilations", leave=False):
        samples = [Sample(stage, torch.randn(4, 1, side, side, generator=g),
                          torch.randn(int(torch.randint(16, 33, (1,), generator=g)), 384, generator=g),
                          torch.randn(384, generator=g), float(torch.rand((), generator=g) * 1000))
                   for (stage, side, _), n in zip(STANDARD_STAGES, counts) for _ in range(n)]
        batch = pack(samples, 3, 2, 4, 384, 384).to(device)
        context = step.model.prepare(batch.layout, step.device)
        torch.nn.functional.mse_loss(step.model(batch, context), torch.randn_like(batch.visual)).backward()
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        if after_first is None:
            after_first = compilations() - start
    return {"batches": len(batches), "compilations_first_batch": after_first,
            "recompilations_after_first_batch": compilations() - start - after_first,
            "distinct_token_counts": len({tuple(c) for c in batches})}


def alternate(runners: dict, steps: int, warmup: int, device: torch.device, desc: str, progress: bool) -> dict:
    """Seconds per call of each runner over ``steps`` rounds after ``warmup``, the runners alternated within
    each round so that drift of the machine hits all alike."""
    times: dict = {key: [] for key in runners}
    for i in tqdm(range(warmup + steps), desc=desc, disable=not progress):
        for key, step in runners.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return times


def compile_comparison(device: torch.device, precisions: tuple[str, ...], peaks: dict[str, float], steps: int = 10,
                       warmup: int = 2, progress: bool = True) -> dict:
    """The standard step eager against compiled blocks (pyraflow.compilation), per precision, alternated round by
    round, medians: ms/step, visual tokens/s, MFU; and the first compiled step's extra time (the compilation, from a
    fresh in-process cache; inductor's on-disk cache of kernels may still serve it, as it serves a training run)."""
    flops = training_flops(standard_batch(), standard_model_config())
    out = {"precisions": list(precisions), "steps": steps}
    for p in precisions:
        reset_compilations()
        runners = {"eager": TrainStep("grouped", p, device), "compiled": TrainStep("grouped", p, device, compiled=True)}
        before = compilations()
        started = time.perf_counter()
        runners["compiled"]()  # compiles, from a fresh cache
        first = time.perf_counter() - started
        times = alternate(runners, steps, warmup, device, f"bench compile {p}", progress)
        entry = {"compilations": compilations() - before}
        for name, ts in times.items():
            seconds = statistics.median(ts)
            entry[name] = {"ms_per_step": 1000 * seconds, "visual_tokens_per_s": VISUAL_TOKENS / seconds,
                           "mfu": flops / seconds / 1e9 / peaks[p]}
        entry["first_step_s"] = first
        entry["compile_s"] = first - entry["compiled"]["ms_per_step"] / 1000
        entry["speedup"] = entry["eager"]["ms_per_step"] / entry["compiled"]["ms_per_step"]
        out[p] = entry
    return out


def shape_comparison(device: torch.device, precision: str, steps: int = 10, warmup: int = 2,
                     progress: bool = True) -> dict:
    """One training step on a batch mixing three aspect ratios against the same stages and counts all square
    (pyraflow.bench.standard.shaped_samples), alternated round by round, medians; per visual token, since the shapes'
    token counts differ a little."""
    from pyraflow.bench.standard import SHAPES, shaped_samples

    runners = {name: TrainStep("grouped", precision, device, samples=shaped_samples(mixed))
               for name, mixed in (("mixed", True), ("square", False))}
    times = alternate(runners, steps, warmup, device, "bench shapes", progress)
    out = {"shapes": {k: list(v) for k, v in SHAPES.items()}, "precision": precision, "steps": steps}
    for name, runner in runners.items():
        layout = runner.batch.layout
        ms = 1000 * statistics.median(times[name])
        out[name] = {"ms_per_step": ms, "visual_tokens": layout.num_visual, "groups": len(layout.groups),
                     "us_per_visual_token": 1000 * ms / layout.num_visual}
    out["mixed_cost_per_token"] = out["mixed"]["us_per_visual_token"] / out["square"]["us_per_visual_token"]
    return out


def scaling_comparison(device: torch.device, scales: list[int], precisions: dict[str, str], steps: int = 5,
                       warmup: int = 1, progress: bool = True) -> dict:
    """The standard batch with latent sides times each scale: pyraflow, the reference's rows and one stage per
    step, alternated round by round, medians. Padding is left out (at scale 4 it is 16 x 4,128 tokens).
    precisions: the precision each variant was fastest in on the standard config."""
    out = {"steps": steps, "variants": list(SCALING_VARIANTS) + (["pyraflow_compiled"] if "compiled" in precisions else []),
           "scales": {}}
    for scale in scales:
        runners = {label: TrainStep(name, precisions.get(name, "fp32"), device, scale=scale)
                   for label, name in SCALING_VARIANTS.items()}
        # compiled blocks (where the toolchain allows), in the precision they were fastest in on the standard config;
        # compiled from a fresh cache in the untimed warm-up round
        if "compiled" in precisions:
            reset_compilations()
            runners["pyraflow_compiled"] = TrainStep("grouped", precisions.get("compiled", "fp32"), device, scale=scale,
                                                 compiled=True)
        times = alternate(runners, steps, warmup, device, f"bench scale {scale}", progress)
        batch = runners["pyraflow"].batch
        visual = batch.layout.num_visual
        flops = training_flops(batch, standard_model_config())
        row_tokens = (runners["reference_columns"].batch.layout.num_text + visual) // ROWS
        entry = {"visual_tokens": visual, "longest_segment_visual": max(batch.layout.visual_lengths),
                 "row_tokens": row_tokens, "gflop_per_step": flops / 1e9}
        base = statistics.median(times["pyraflow"])
        for label, ts in times.items():
            ms = 1000 * statistics.median(ts)
            entry[label] = {"ms_per_step": ms, "visual_tokens_per_s": visual / (ms / 1000),
                            "precision": runners[label].precision, "pyraflow_speedup": ms / (1000 * base)}
        out["scales"][str(scale)] = entry
        del runners
    return out


def run_bench(steps: int = 10, warmup: int = 2, threads: int | None = None, progress: bool = True,
              variants: list[str] | None = None, scales: list[int] | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = variants or variant_names(device)
    timed, why = host_precisions(device)
    dtypes = {p: d for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if p in timed}
    # the peak is the best of two moments (before and after the steps): one short measurement taken while the
    # host is busy can read far below the machine's peak, and every MFU read against it would be inflated
    peak_size = 8192 if device.type == "cuda" else 2048  # a GPU needs a large product to reach its peak
    peak_runs = {p: [matmul_peak_gflops(dtype, device, peak_size)] for p, dtype in dtypes.items()}
    runs = [(n, p) for n in names for p in variant_precisions(n, device)]
    runners = {(n, p): TrainStep(n, p, device) for n, p in runs}
    times = alternate(runners, steps, warmup, device, "bench rounds", progress)
    flops = training_flops(standard_batch(), standard_model_config())
    result = {"machine": machine(), "precisions": {"timed": list(timed), "why": why}, "config": {"blocks": 4, "width": 256, "heads": 4, "patch": 2, "channels": 4,
              "stages": [8, 16, 32], "samples_per_stage": [4, 8, 4], "visual_tokens": VISUAL_TOKENS,
              "gflop_per_step": flops / 1e9, "steps": steps}, "variants": {}}
    for name in names:
        fastest = min(variant_precisions(name, device), key=lambda p: statistics.median(times[(name, p)]))
        ms = 1000 * statistics.median(times[(name, fastest)])
        layout, backend, modulation = {**VARIANTS, **CUDA_VARIANTS}[name]
        runner = runners[(name, fastest)]
        peak = cuda_peak_memory_mb(runner) if device.type == "cuda" else accounted_memory_mb(runner)
        result["variants"][name] = {
            "ms_per_step": ms,
            "visual_tokens_per_s": VISUAL_TOKENS / (ms / 1000),
            "peak_mem_mb": peak,
            "peak_mem_method": "cuda max_memory_allocated" if device.type == "cuda"
            else "accounted (params, grads, AdamW, saved activations)",
            "precision": fastest,
            "layout": layout,
            "attention": backend,
            "modulation": modulation,
            "model_gflops": flops / 1e9 / (ms / 1000),
            "ms_per_step_by_precision": {p: 1000 * statistics.median(times[(name, p)])
                                         for p in variant_precisions(name, device)},
        }
    variants_out = result["variants"]
    result["backends"] = {n: variants_out[n] for n in BACKEND_VARIANTS if n in variants_out}
    base = variants_out.get("grouped")
    result["throughput"] = {}
    for label, name in THROUGHPUT_VARIANTS.items():
        if name in variants_out:
            entry = dict(variants_out[name])
            if base:
                entry["pyraflow_speedup"] = base["visual_tokens_per_s"] / entry["visual_tokens_per_s"]
            result["throughput"][label] = entry
    for p, dtype in dtypes.items():
        peak_runs[p].append(matmul_peak_gflops(dtype, device, peak_size))
    peaks = {p: max(observed) for p, observed in peak_runs.items()}
    if base:
        result["mfu"] = {
            "fp32_peak_gflops": peaks["fp32"],
            "bf16_peak_gflops": peaks.get("bf16"),
            "peak_gflops_observed": peak_runs,
            "variant": "grouped",
            "fraction_of_fp32_peak": flops / 1e9 / (base["ms_per_step_by_precision"]["fp32"] / 1000) / peaks["fp32"],
            **({"fraction_of_bf16_peak": flops / 1e9 / (base["ms_per_step_by_precision"]["bf16"] / 1000) / peaks["bf16"]}
               if "bf16" in peaks else {}),
            "wide": wide_mfu(device, peaks["fp32"]),
        }
    result["shapes"] = shape_comparison(device, variants_out["grouped"]["precision"] if "grouped" in variants_out
                                        else "fp32", steps, warmup, progress)
    can_compile, toolchain_note = toolchain(device)
    result["compile"] = (compile_comparison(device, timed, peaks, steps, warmup, progress) if can_compile
                         else {"skipped": toolchain_note})
    result["sampling"] = sampling_comparison(device)
    if can_compile:
        result["sampling_compiled"] = sampling_comparison(device, compiled=True)
    result["history_cache"] = history_cache_comparison(device)
    result["stability"] = stability(compiled_steps=can_compile, device=device)
    if scales:
        fastest = {n: v["precision"] for n, v in variants_out.items()}
        if can_compile:
            fastest["compiled"] = min(timed, key=lambda p: result["compile"][p]["compiled"]["ms_per_step"])
        result["scaling"] = scaling_comparison(device, scales, fastest, progress=progress)
    return result


def format_bench(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']} ({m['cores']} cores, {m['threads']} threads), torch {m['torch']}, {m['date']}",
             f"precisions timed: {', '.join(result['precisions']['timed'])} ({result['precisions']['why']})",
             f"{'variant':<30} {'precision':<9} {'ms/step':>8} {'visual tok/s':>12} {'GFLOP/s':>8} {'memory MB':>9}"]
    for name, r in result["variants"].items():
        lines.append(f"{name:<30} {r['precision']:<9} {r['ms_per_step']:>8.1f} {r['visual_tokens_per_s']:>12.0f} "
                     f"{r['model_gflops']:>8.1f} {r['peak_mem_mb']:>9.1f}")
    if "mfu" in result:
        mfu = result["mfu"]
        bf16 = (f", bf16 {mfu['bf16_peak_gflops']:.0f}" if mfu.get("bf16_peak_gflops") else "")
        bf16_share = (f", {100 * mfu['fraction_of_bf16_peak']:.0f}% of bf16 peak" if "fraction_of_bf16_peak" in mfu else "")
        lines.append(f"matmul peak: fp32 {mfu['fp32_peak_gflops']:.0f} GFLOP/s{bf16}; grouped "
                     f"reaches {100 * mfu['fraction_of_fp32_peak']:.0f}% of fp32 peak{bf16_share}; "
                     f"width 384 with 280-token segments: {100 * mfu['wide']['fraction_of_fp32_peak']:.0f}% of fp32 peak")
    if "skipped" in result["compile"]:
        lines.append(f"compiled blocks: not timed ({result['compile']['skipped']})")
    for p in result["compile"].get("precisions", []):
        c = result["compile"][p]
        lines.append(f"compiled blocks, {p}: {c['compiled']['ms_per_step']:.1f} ms/step vs eager {c['eager']['ms_per_step']:.1f} "
                     f"({c['speedup']:.2f}x; MFU {100 * c['compiled']['mfu']:.0f}% vs {100 * c['eager']['mfu']:.0f}%), "
                     f"compilation {c['compile_s']:.0f} s, {c['compilations']} compiled frame(s)")
    sh = result["shapes"]
    lines.append(f"mixed shapes (portrait, square, landscape): {sh['mixed']['ms_per_step']:.1f} ms/step for "
                 f"{sh['mixed']['visual_tokens']} visual tokens in {sh['mixed']['groups']} groups; all square "
                 f"{sh['square']['ms_per_step']:.1f} ms for {sh['square']['visual_tokens']} in {sh['square']['groups']}: "
                 f"{sh['mixed_cost_per_token']:.2f}x the cost per token")
    sp = result["sampling"]
    lines.append(f"sampling {sp['images']} images, {sp['total_steps']} steps: pyramid {sp['pyramid_s']:.2f} s "
                 f"(per stage {', '.join(f'{t:.2f}' for t in sp['pyramid_stage_s'])}), flat {sp['flat_s']:.2f} s, "
                 f"{sp['ratio']:.2f}x faster")
    sc = result.get("sampling_compiled")
    if sc:
        lines.append(f"  compiled: pyramid {sc['pyramid_s']:.2f} s, flat {sc['flat_s']:.2f} s, {sc['ratio']:.2f}x faster; "
                 f"compiled pyramid vs eager pyramid {sp['pyramid_s'] / sc['pyramid_s']:.2f}x")
    hc = result["history_cache"]
    lines.append(f"video sampling, {hc['videos']} videos of {hc['latent'][1]} frames: history cache {hc['cached_s']:.2f} s, "
                 f"recomputed {hc['recomputed_s']:.2f} s, {hc['speedup']:.2f}x faster ({hc['last_unit_speedup']:.2f}x on the last unit)")
    st = result["stability"]
    lines.append(f"stability over {st['steps']} steps ({st['mix']}): token budget: tokens CV {100 * st['tokens_cv']:.2f}%, "
                 f"memory range {100 * st['peak_mem_range_frac']:.1f}% of mean; fixed 16 samples: tokens CV "
                 f"{100 * st['fixed_batch']['tokens_cv']:.2f}%, memory range {100 * st['fixed_batch']['peak_mem_range_frac']:.1f}%")
    if "compiled" in st:
        rc = st["compiled"]
        lines.append(f"compiled blocks over those {rc['batches']} batches ({rc['distinct_token_counts']} distinct stage counts): "
                     f"{rc['compilations_first_batch']} compiled frame(s) at the first batch, "
                     f"{rc['recompilations_after_first_batch']} recompilation(s) after it")
    for scale, e in result.get("scaling", {}).get("scales", {}).items():
        lines.append(f"scale {scale} ({e['visual_tokens']} visual tokens, rows of {e['row_tokens']} tokens): pyraflow "
                     f"{e['pyraflow']['ms_per_step']:.0f} ms/step; reference rows {e['reference_columns']['pyraflow_speedup']:.2f}x, "
                     f"one stage per step {e['per_stage']['pyraflow_speedup']:.2f}x slower" + (
                         f"; compiled {e['pyraflow_compiled']['ms_per_step']:.0f} ms/step "
                         f"({1 / e['pyraflow_compiled']['pyraflow_speedup']:.2f}x eager, {e['pyraflow_compiled']['precision']})"
                         if "pyraflow_compiled" in e else ""))
    if "quality" in result:
        from pyraflow.bench.study import format_study

        lines.append(format_study(result["quality"]))
    return "\n".join(lines)
