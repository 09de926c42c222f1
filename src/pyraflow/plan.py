"""``pyraflow plan``: the schedule's numbers and a simulation of the batcher, before any training.

Answers the questions one asks before a run: which sigma and timestep window each stage gets, how
many samples of each stage a batch holds, how steady the tokens per step are, whether the realised
mix tracks the target, and roughly how much activation memory a step takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pyraflow.batching import TokenBudgetBatcher, example_classes
from pyraflow.config import Config, ModelConfig
from pyraflow.data import planned_size, resolve_buckets
from pyraflow.schedule import PyramidSchedule


# ----- cost estimates (also the bench's FLOP counts) -----------------------------------------------------

def linear_flops_per_token(cfg: ModelConfig) -> float:
    """Forward multiply-add FLOPs (x2) of every linear layer per visual or text token per block."""
    d = cfg.width
    return 2 * (3 * d * d + d * d + 2 * d * int(d * cfg.mlp_ratio))


def estimate_activation_bytes(cfg: ModelConfig, segment_lengths: list[int], bytes_per_element: int = 2,
                              checkpoint_fraction: float | None = None, sequence_parallel: int = 1) -> int:
    """Rough activation memory of one training step on one GPU: what autograd keeps per token per block (norm
    outputs, q/k/v, attention output, MLP input and hidden, residuals: about (16 + 2 * mlp_ratio) * width values),
    times tokens and blocks; a checkpointed block keeps only its input (width values per token) and one block is
    recomputed at a time. Attention is assumed flash-style (no L x L scores kept). Split over ``sequence_parallel``
    ranks, each GPU holds 1/N of the tokens (the exchange's copies, every token for 1/N of the heads, take the place of
    the q, k, v and attention output counted per token) plus the gathered output: every token's C * p * p
    prediction, counted in fp32."""
    fraction = cfg.checkpoint_fraction if checkpoint_fraction is None else checkpoint_fraction
    tokens = sum(segment_lengths)
    per_token = (16 + 2 * cfg.mlp_ratio) * cfg.width
    blocks = cfg.depth + cfg.single_depth
    checkpointed = round(fraction * blocks)
    kept = (blocks - checkpointed) * per_token + checkpointed * cfg.width + (per_token if checkpointed else 0)
    gathered = tokens * cfg.in_channels * cfg.patch_size**2 * 4 if sequence_parallel > 1 else 0
    return int(tokens * kept * bytes_per_element / sequence_parallel + gathered)


def schedule_report(schedule: PyramidSchedule) -> dict:
    cfg = schedule.config
    return {
        "name": cfg.preset,
        "gamma": cfg.gamma,
        "shift": cfg.shift,
        "num_timesteps": cfg.num_timesteps,
        "stages": [
            {
                "stage": s.stage,
                "downsample": s.downsample,
                "sigma_start": s.sigma_start,
                "sigma_end": s.sigma_end,
                "timestep_window": list(s.timestep_window),
            }
            for s in schedule.stages
        ],
    }


def planned_bucket_counts(config: Config, buckets) -> list[int]:
    """Samples per bucket, from the items' sizes where possible (no decoding of images); clips are cut for real."""
    from pyraflow.data import build_dataset
    from pyraflow.data.datasets import Shaper, VideoClips

    if config.data.dataset == "pyramid-flow" and config.data.path and Path(config.data.path).is_file():
        from pyraflow.data.pyramid_flow import load_annotations

        return load_annotations(config).pool_sizes
    if len(buckets) == 1:
        return [planned_size(config.data)]
    if config.data.num_samples is not None:
        raise ValueError("data.num_samples cannot say how samples fall into buckets; plan with the data at hand.")
    dataset = build_dataset(config.data, buckets=buckets)
    counts = [0] * len(buckets)
    if isinstance(dataset, VideoClips):
        for clip in dataset.clips():
            counts[clip.bucket] += 1
        return counts
    shaper = Shaper(config.data, buckets)
    for width, height in dataset.item_sizes():
        counts[shaper.bucket_for(width, height)] += 1
    return counts


def data_ranks(config: Config, world_size: int) -> int:
    """Batches trained at once: one per sequence-parallel group."""
    ranks = config.train.sequence_parallel
    if world_size % ranks:
        raise ValueError(f"--world-size {world_size} is not a multiple of train.sequence_parallel={ranks}; plan for "
                         f"{ranks * max(1, world_size // ranks)} ranks, or another group size.")
    return world_size // ranks


def simulate(config: Config, steps: int, world_size: int = 1, progress: bool = False) -> dict:
    """Run the batcher for ``steps`` steps on rank 0 and summarise what it chose."""
    if steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1.")
    batches, split = data_ranks(config, world_size), config.train.sequence_parallel
    k = config.schedule.stages
    buckets = resolve_buckets(config)
    bucket_counts = planned_bucket_counts(config, buckets)
    classes = example_classes(config, buckets, bucket_counts)  # per stage (bucket) (unit)
    class_stage = np.asarray(classes.stages)
    class_bucket = np.asarray(classes.buckets)
    class_tokens = np.asarray(classes.segment_tokens, dtype=np.float64)
    batcher = TokenBudgetBatcher(config.batching, classes.segment_tokens, classes.mix, bucket_counts, 0, batches,
                                 classes.names(), classes.buckets)

    def per_stage(values: np.ndarray) -> np.ndarray:
        return np.bincount(class_stage, weights=values, minlength=k)

    def per_bucket(values: np.ndarray) -> np.ndarray:
        return np.bincount(class_bucket, weights=values, minlength=len(buckets))

    bucket_samples = np.zeros((steps, len(buckets)))
    bucket_tokens = np.zeros((steps, len(buckets)))
    bucket_memory = np.zeros((steps, len(buckets)))

    tokens = np.zeros(steps)
    counts = np.zeros((steps, k))
    stage_tokens = np.zeros((steps, k))
    target = np.zeros((steps, k))
    activation = np.zeros(steps)
    largest: list[int] = []
    for i in tqdm(range(steps), desc="simulating batches", disable=not progress, leave=False):
        target[i] = per_stage(classes.mix.ratio(i))
        batch = batcher.next_batch()
        tokens[i] = batch.tokens
        class_counts = np.asarray(batch.counts, dtype=np.float64)
        counts[i] = per_stage(class_counts)
        stage_tokens[i] = per_stage(class_counts * class_tokens)
        lengths = [classes.segment_tokens[c] for c in batch.classes]
        activation[i] = estimate_activation_bytes(config.model, lengths, sequence_parallel=split)
        if activation[i] == activation.max():
            largest = lengths
        bucket_samples[i] = per_bucket(class_counts)
        bucket_tokens[i] = per_bucket(class_counts * class_tokens)
        for b in range(len(buckets)):
            bucket_memory[i, b] = estimate_activation_bytes(
                config.model, [classes.segment_tokens[c] for c in batch.classes if classes.buckets[c] == b],
                sequence_parallel=split)
    segment_tokens = [float(stage_tokens[:, s].sum() / max(counts[:, s].sum(), 1)) for s in range(k)]
    if config.batching.ratio_unit == "samples":
        realised = counts.sum(0) / counts.sum()
    else:
        realised = stage_tokens.sum(0) / stage_tokens.sum()
    samples = counts.sum(1)
    return {
        "steps": steps,
        "ratio_unit": config.batching.ratio_unit,
        "token_budget": config.batching.token_budget,
        "per_stage": [
            {
                "stage": s,
                "segment_tokens": segment_tokens[s],
                "target_ratio": float(target[:, s].mean()),
                "realised_ratio": float(realised[s]),
                "samples_per_batch_mean": float(counts[:, s].mean()),
                "tokens_per_batch_mean": float(stage_tokens[:, s].mean()),
            }
            for s in range(k)
        ],
        "per_bucket": [
            {
                "bucket": bucket.name,
                "height": bucket.height,
                "width": bucket.width,
                "frames": bucket.frames,
                "data_share": float(bucket_counts[b] / sum(bucket_counts)),
                "realised_share": float(bucket_samples[:, b].sum() / bucket_samples.sum()),
                "samples_per_step_mean": float(bucket_samples[:, b].mean()),
                "tokens_per_step_mean": float(bucket_tokens[:, b].mean()),
                "activation_memory_mb_mean": float(bucket_memory[:, b].mean() / 2**20),
            }
            for b, bucket in enumerate(buckets)
        ],
        "tokens_per_step": {
            "mean": float(tokens.mean()),
            "cv": float(tokens.std() / tokens.mean()),
            "min": int(tokens.min()),
            "max": int(tokens.max()),
        },
        "samples_per_step": {"mean": float(samples.mean()), "min": int(samples.min()), "max": int(samples.max())},
        "global_batch": {
            "world_size": world_size,
            "sequence_parallel": config.train.sequence_parallel,
            "grad_accum": config.train.grad_accum,
            "samples_mean": float(samples.mean() * batches * config.train.grad_accum),
            "tokens_mean": float(tokens.mean() * batches * config.train.grad_accum),
        },
        "activation_memory_mb": {
            "bytes_per_element": 2,
            "mean": float(activation.mean() / 2**20),
            "max": float(activation.max() / 2**20),
            "note": "autograd activations per rank, bf16, flash-style attention; weights and optimizer excluded",
        },
        "epochs": sum(batcher.consumed) / max(1, sum(batcher.shard_sizes)),
        "largest_batch": largest,
    }


LORA_PLAN_RANK = 64  # the adapter rank planned for when the config trains every weight


def parameter_counts(config: Config) -> tuple[int, int, int]:
    """(parameters of the model, of its LoRA adapters at the configured rank (or LORA_PLAN_RANK), that rank),
    counted on a model built without memory (meta device)."""
    import torch

    from pyraflow.archs import build_model
    from pyraflow.lora import DEFAULT_TARGETS

    with torch.device("meta"):
        model = build_model(config.model)
    total = sum(p.numel() for p in model.parameters())
    lora = config.train.lora
    rank = lora.rank or LORA_PLAN_RANK
    targets = lora.targets or DEFAULT_TARGETS[config.model.arch]
    adapters = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    return total, adapters, rank


def memory_report(config: Config, world_size: int, segment_lengths: list[int]) -> dict:
    """Memory per GPU of the largest simulated batch, for full fine-tuning and LoRA, sharded (FSDP) over
    ``world_size`` ranks or replicated (DDP), with and without activation checkpointing. Trained weights cost
    20 bytes each (fp32 weight, gradient, two AdamW moments, EMA), frozen ones 4 (fp32); activations per GPU under
    train.sequence_parallel as ``estimate_activation_bytes`` counts them."""
    total, adapters, rank = parameter_counts(config)
    gb, ranks = 2**30, config.train.sequence_parallel
    activations = {f: estimate_activation_bytes(config.model, segment_lengths, 2, f, ranks) / gb for f in (0.0, 1.0)}
    rows = []
    for parallel, shards in (("fsdp", world_size), ("ddp", 1)):
        for name, trained, frozen in (("full", total, 0), (f"lora-r{rank}", adapters, total)):
            states = (20 * trained + 4 * frozen) / shards / gb
            rows += [{"mode": name, "parallel": parallel, "ranks": world_size, "checkpointing": bool(f),
                      "weights_and_optimizer_gb": states, "activations_gb": activations[f],
                      "total_gb": states + activations[f]} for f in (0.0, 1.0)]
    return {"parameters": total, "lora_parameters": adapters, "lora_rank": rank, "per_gpu": rows,
            "sequence_parallel": ranks, "tokens": sum(segment_lengths), "tokens_per_gpu": -(-sum(segment_lengths) // ranks),
            "note": "activations of the largest simulated batch (bf16); trained weights 20 B (fp32 weight, gradient, "
                    "AdamW moments, EMA), frozen 4 B; FSDP shards both over the ranks; excludes the CUDA context and "
                    "allocator slack (add ~10-20%)"}


def plan_report(config: Config, steps: int, world_size: int = 1, progress: bool = False) -> dict:
    schedule = schedule_report(PyramidSchedule(config.schedule))
    batches = simulate(config, steps, world_size, progress)
    largest = batches.pop("largest_batch")
    for entry, stage_stats in zip(schedule["stages"], batches.pop("per_stage")):
        entry.update({k: v for k, v in stage_stats.items() if k != "stage"})
    return {"schedule": schedule, **batches, "memory": memory_report(config, world_size, largest)}


def format_report(report: dict) -> str:
    s = report["schedule"]
    lines = [
        f"schedule: {s['name']}  (gamma={s['gamma']:.4g}, shift={s['shift']:.4g}, timesteps 0..{s['num_timesteps']})",
        "",
        f"{'stage':>5} {'down':>4} {'sigma start':>11} {'sigma end':>9} {'timesteps':>17} "
        f"{'tokens':>6} {'target':>7} {'realised':>8} {'samples/b':>9} {'tokens/b':>8}",
    ]
    for st in s["stages"]:
        t_max, t_min = st["timestep_window"]
        lines.append(
            f"{st['stage']:>5} {st['downsample']:>3}x {st['sigma_start']:>11.4f} {st['sigma_end']:>9.4f} "
            f"{t_max:>8.1f}->{t_min:>7.1f} {st['segment_tokens']:>6.0f} {st['target_ratio']:>7.3f} "
            f"{st['realised_ratio']:>8.3f} {st['samples_per_batch_mean']:>9.2f} {st['tokens_per_batch_mean']:>8.1f}"
        )
    t = report["tokens_per_step"]
    g = report["global_batch"]
    groups = f" in groups of {g['sequence_parallel']} sharing a batch" if g["sequence_parallel"] > 1 else ""
    a = report["activation_memory_mb"]
    lines += [
        "",
        f"{report['steps']} simulated steps, budget {report['token_budget']} tokens, mix by {report['ratio_unit']}",
        f"tokens/step: mean {t['mean']:.1f}  cv {100 * t['cv']:.2f}%  min {t['min']}  max {t['max']}",
        f"samples/step: mean {report['samples_per_step']['mean']:.2f}  "
        f"min {report['samples_per_step']['min']}  max {report['samples_per_step']['max']}",
        f"global batch ({g['world_size']} rank(s){groups} x {g['grad_accum']} accumulation): {g['samples_mean']:.1f} "
        f"samples, {g['tokens_mean']:.0f} tokens per optimizer step",
        f"activation memory (bf16, per rank): mean {a['mean']:.1f} MB, max {a['max']:.1f} MB",
        f"epochs covered: {report['epochs']:.2f}",
    ]
    m = report["memory"]
    if m["sequence_parallel"] > 1:
        lines += ["", f"sequence parallel x{m['sequence_parallel']}: largest batch {m['tokens']} tokens, "
                      f"{m['tokens_per_gpu']} per GPU"]
    lines += ["", f"parameters: {m['parameters'] / 1e6:,.1f} M; LoRA rank {m['lora_rank']} adapters on the attention "
                  f"projections: {m['lora_parameters'] / 1e6:,.1f} M",
              f"memory per GPU, largest batch (GB): {'mode':>10} {'parallel':>12} {'checkpointing':>13} "
              f"{'weights+optim':>13} {'activations':>11} {'total':>7}"]
    for row in m["per_gpu"]:
        parallel = f"{row['parallel']} x{row['ranks']}" if row["parallel"] == "fsdp" else f"ddp x{row['ranks']}"
        lines.append(f"{'':>35}{row['mode']:>10} {parallel:>12} {'yes' if row['checkpointing'] else 'no':>13} "
                     f"{row['weights_and_optimizer_gb']:>13.1f} {row['activations_gb']:>11.1f} {row['total_gb']:>7.1f}")
    if len(report["per_bucket"]) > 1:
        lines += ["", f"{'bucket':>10} {'aspect':>6} {'data share':>10} {'realised':>8} {'samples/step':>12} "
                      f"{'tokens/step':>11} {'memory MB':>9}"]
        for b in report["per_bucket"]:
            lines.append(f"{b['bucket']:>10} {b['width'] / b['height']:>6.2f} {b['data_share']:>10.3f} "
                         f"{b['realised_share']:>8.3f} {b['samples_per_step_mean']:>12.2f} {b['tokens_per_step_mean']:>11.1f} "
                         f"{b['activation_memory_mb_mean']:>9.1f}")
    return "\n".join(lines)
