"""``pyraflow bench --full``: sample quality at equal compute.

A config's model (the MNIST demo's by default; ``--config`` another, e.g. configs/emoji.yaml) is trained for the
same wall time (the steps that fit in it, timed first) in several arms: stage mixes (uniform, 25/50/25, a progressive
mix, flat single-stage flow matching at full resolution), the one-factor-at-a-time diagnosis arms of
DIAGNOSIS_VARIANTS, or arms given on the command line (``--arm NAME SETTING...``, e.g. a learning-rate search).
Every arm keeps the config's model, data, token budget and EMA; only its own settings change.

Each run writes a checkpoint at every ``1/checkpoints`` of its steps and each is scored with ``pyraflow eval``
(FID (EfficientNet-Lite0), and digit accuracy for digits), so a study gives FID against training minutes. A flat arm
is scored at the pyramid's sampling compute (as many full-resolution Euler steps as the pyramid's sampling costs in
model FLOPs: equal_compute_steps), and its final checkpoint once more at the pyramid's total step count, which gives
flat about twice the pyramid's sampling compute. Each run reports its throughput (samples and visual tokens per
second, model FLOPs per step) and its last per-stage losses, from its metrics.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path

from pyraflow.reporting import load_metrics
from pyraflow.storage import atomic_path

FLAT = ["schedule.stages=1", "batching.mix.ratio=uniform", "sample.steps=30"]

STUDY_VARIANTS = {
    "uniform": ["batching.mix.ratio=uniform"],
    "25-50-25": ["batching.mix.ratio=25-50-25"],
    "progressive": ["batching.mix.kind=linear",
                    "batching.mix.points=[{step: 0, ratio: [0.5, 0.3, 0.2]}, {step: 500, ratio: 25-50-25}]"],
    "flat": FLAT,
}

# One factor at a time against the config as it is (the diagnosis of where a 3-stage pyramid loses to flat).
# "equal-samples" is filled in per config (see arm_settings).
DIAGNOSIS_VARIANTS = {
    "patch4": ["model.patch_size=4"],
    "patch8": ["model.patch_size=8"],
    "flat-patch4": FLAT + ["model.patch_size=4"],
    "flat-patch8": FLAT + ["model.patch_size=8"],
    "stages2": ["schedule.stages=2", "batching.mix.ratio=uniform"],
    "gamma0.1": ["schedule.gamma=0.1"],  # weaker block-noise correlation, so each stage starts at more noise
    # (block noise off altogether is a sampling-only factor: --eval-independent-jumps)
    "density-uniform": ["schedule.density=uniform"],
    "shift2": ["schedule.shift=2"],
    "equal-samples": [],
    # more of the (nearly free) stage-0 samples, taken from stage 1: the emoji demo's mix
    "50-30-20": ["batching.mix.ratio=[0.5, 0.3, 0.2]"],
}
ARMS = {**STUDY_VARIANTS, **DIAGNOSIS_VARIANTS}


CALIBRATION_WARMUP_STEPS = 5  # untimed: the first steps pay for allocation and lazy initialisation
CALIBRATION_STEPS = 25  # timed steps that size each run to its minutes
TIME_LIMIT_SLACK = 1.1  # the guard: a run slowed by something else on the machine still ends near its minutes


def steps_in(config, minutes: float, out_dir: Path) -> int:
    """How many training steps of ``config`` fit in ``minutes``: the median of CALIBRATION_STEPS timed steps of a
    throwaway run. Runs are then given that many steps, so a decaying LR schedule ends where the time does (and a
    run stays deterministic, unlike one stopped by the clock); the time limit stays as a guard."""
    import shutil

    from pyraflow.train import Trainer

    trainer = Trainer(config, out_dir, progress=False)
    try:
        times = []
        for i in range(CALIBRATION_WARMUP_STEPS + CALIBRATION_STEPS):
            started = time.perf_counter()
            trainer.read_metrics(trainer.train_step())  # reading the metrics waits for the step on any device
            if i >= CALIBRATION_WARMUP_STEPS:
                times.append(time.perf_counter() - started)
    finally:
        trainer.close()
        shutil.rmtree(out_dir, ignore_errors=True)
    return max(1, int(minutes * 60 / statistics.median(times)))


def visual_tokens_per_stage(config) -> list[int]:
    """Visual tokens of one sample at each stage of a single-shape config (every frame, patchified)."""
    _, frames, height, width = config.latent_shape()
    k_max, patch = config.schedule.stages - 1, config.model.patch_size
    return [frames * ((height >> (k_max - k)) // patch) * ((width >> (k_max - k)) // patch) for k in range(k_max + 1)]


def forward_flops_per_stage(config) -> list[float]:
    """Model FLOPs of one forward pass over one sample at each stage (text at its full ``text.max_tokens``)."""
    from pyraflow.bench.standard import segment_flops

    return [segment_flops(config.text.max_tokens, v, config.model) for v in visual_tokens_per_stage(config)]


def sampling_flops(config) -> float:
    """Model FLOPs of sampling one picture with ``config``'s Euler steps per stage (guidance doubles every arm alike,
    so it is left out)."""
    steps = config.sample.steps_per_stage(config.schedule.stages)
    return sum(n * f for n, f in zip(steps, forward_flops_per_stage(config)))


def equal_compute_steps(flat_config, pyramid_config) -> int:
    """Full-resolution Euler steps whose model FLOPs equal the pyramid's sampling of one picture."""
    return max(1, round(sampling_flops(pyramid_config) / forward_flops_per_stage(flat_config)[-1]))


def pyramid_counterpart(flat_config, base):
    """The pyramid a flat run is measured against: the flat run's own config (its patch size, text, ...) with the
    base config's stages and sampling steps."""
    from dataclasses import replace

    return replace(flat_config, schedule=replace(flat_config.schedule, stages=base.schedule.stages), sample=base.sample)


@contextlib.contextmanager
def independent_jump_noise():
    """Sample with the corrective block noise switched off: stage jumps add independent unit Gaussian noise (same
    coefficients) instead of noise correlated -gamma within each 2x2 block, so the correlation nearest upsampling
    gave the noise stays. The "block noise off" arm of the diagnosis (a sampling-only factor: training draws fresh
    noise at every stage start either way)."""
    from unittest import mock

    import torch

    from pyraflow import schedule

    def independent(shape, gamma, generator=None, dtype=torch.float32, device=None):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    with mock.patch.object(schedule, "block_noise", independent):
        yield


def arm_settings(name: str, base_config) -> list[str]:
    """The settings of a named arm for ``base_config``: "equal-samples" caps every batch at the samples a
    full-resolution batch holds (so the pyramid's batches carry fewer tokens), the others are fixed lists."""
    if name not in ARMS:
        raise ValueError(f"unknown study arm {name!r}; choose from {', '.join(ARMS)} or give your own with "
                         "--arm NAME SETTING...")
    if name == "equal-samples":
        full = base_config.text.max_tokens + visual_tokens_per_stage(base_config)[-1]
        return [f"batching.max_samples={max(1, base_config.batching.token_budget // full)}"]
    return list(ARMS[name])


def throughput(run_dir: Path, config) -> dict:
    """Samples and visual tokens per second, model FLOPs per step and the last logged per-stage losses of a run,
    from its metrics.jsonl (the logged steps after the first, so start-up and compilation are left out)."""
    rows = load_metrics(run_dir / "metrics.jsonl")[1:]
    if not rows:
        return {}
    per_stage = visual_tokens_per_stage(config)
    flops = [3 * f for f in forward_flops_per_stage(config)]
    seconds = sum(r["seconds"] for r in rows)
    samples = [sum(r["samples_stage"]) for r in rows]
    visual = [sum(n * t for n, t in zip(r["samples_stage"], per_stage)) for r in rows]
    last = rows[-1]
    return {"samples_per_s": sum(samples) / seconds, "visual_tokens_per_s": sum(visual) / seconds,
            "step_s_logged": seconds / len(rows),
            "gflop_per_step": statistics.mean(sum(n * f for n, f in zip(r["samples_stage"], flops)) for r in rows) / 1e9,
            "stage_loss_last": {k: last[f"loss_stage{k}"] for k in range(len(per_stage)) if f"loss_stage{k}" in last}}


def training_minutes_at(rows: list[dict], step: int) -> float:
    """Training minutes up to ``step`` from a run's metrics: each logged row times one step (its ``seconds``), taken
    for every step since the previous row (the last row's for steps after it); steps only: no evaluation, grids or
    checkpoint writes."""
    total, previous = 0.0, 0
    for r in rows:
        total += r["seconds"] * (min(r["step"], step) - previous)
        previous = r["step"]
        if previous >= step:
            break
    else:
        if rows and step > previous:
            total += rows[-1]["seconds"] * (step - previous)
    return total / 60


def minutes_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first minute at which a (minutes, score) curve of a lower-is-better score (FID, caption-match rank)
    reaches ``target``, interpolated linearly between its points; None if it never does."""
    previous = None
    for minutes, score in curve:
        if score <= target:
            if previous is None:
                return minutes
            (m0, f0), (m1, f1) = previous, (minutes, score)
            return m0 + (m1 - m0) * (f0 - target) / (f0 - f1)
        previous = (minutes, score)
    return None


def mean_curve(runs: list[dict], key: str = "fid") -> list[tuple[float, float]]:
    """A score (``key`` of each curve point: fid, caption_match, caption_match_rank) against training minutes
    averaged over seeds, checkpoint by checkpoint; a checkpoint that some run has no score for (a study rescored
    at a few checkpoints only) is left out."""
    points = min(len(r["curve"]) for r in runs)
    return [(statistics.mean(r["curve"][i]["minutes"] for r in runs),
             statistics.mean(r["curve"][i][key] for r in runs)) for i in range(points)
            if all(r["curve"][i].get(key) is not None for r in runs)]


def quality_study(out_dir: str | Path, minutes: float = 10.0, seeds: list[int] | tuple[int, ...] = (0,),
                  num_eval: int = 200, progress: bool = True, config_path: str | None = None,
                  overrides: list[str] | None = None, variants: list[str] | None = None,
                  arms: dict[str, list[str]] | None = None, checkpoints: int = 4, eval_steps: list[int] | None = None,
                  eval_independent_jumps: bool = False) -> dict:
    """Train and evaluate every arm (the four STUDY_VARIANTS by default; named ones of ARMS; ``arms``: extra named
    settings, where a bare arm name among them stands for that arm's settings) of the config at ``config_path``
    (None: the demo) with ``overrides`` for ``minutes`` with each seed (seed-major, so an interrupted study still
    holds whole seeds). ``eval_steps``: also score each final checkpoint at these Euler steps per stage;
    ``eval_independent_jumps``: and each pyramid's without corrective block noise (independent_jump_noise). Reports
    each run and the mean over seeds, and how many minutes flat and the best pyramid arm need to reach each other's
    final FID."""
    from pyraflow.bench.standard import machine
    from pyraflow.config import load_config

    overrides = list(overrides or [])
    base = load_config(config_path, overrides)
    plan = {name: arm_settings(name, base) for name in (variants or ([] if arms else list(STUDY_VARIANTS)))}
    for name, settings in (arms or {}).items():
        plan[name] = [s for item in settings for s in (arm_settings(item, base) if "=" not in item else [item])]
    out_dir = Path(out_dir)
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    for seed in seeds:
        for name, arm in plan.items():
            settings = overrides + arm + [f"train.seed={seed}", f"batching.seed={seed}", "train.sample_every=0",
                                          "train.keep_checkpoints=0"]
            steps = steps_in(load_config(config_path, settings + ["train.checkpoint_every=0"]), minutes,
                             out_dir / f"seed{seed}" / f"{name}-calibration")
            config = load_config(config_path, settings + [
                f"train.steps={steps}", f"train.checkpoint_every={math.ceil(steps / checkpoints)}",
                f"train.time_limit_minutes={TIME_LIMIT_SLACK * minutes}"])
            runs[name].append(train_and_score(config, base, out_dir / f"seed{seed}" / name, seed, num_eval, progress,
                                              eval_steps or [], eval_independent_jumps))
    return summarise(runs, {"config": config_path or "built-in defaults (configs/mnist.yaml)", "machine": machine(),
                            "overrides": overrides, "minutes_per_variant": minutes, "seeds": list(seeds),
                            "eval_samples": num_eval, "arms": plan})


def train_and_score(config, base, run_dir: Path, seed: int, num_eval: int, progress: bool, eval_steps: list[int],
                    eval_independent_jumps: bool) -> dict:
    """One run of the study: train ``config``, score every checkpoint it wrote (a flat run at the sampling compute
    of ``base``'s pyramid, then once at its step count), then the extra scores asked for; with its throughput."""
    from pyraflow.evaluation import evaluate
    from pyraflow.train import run_training

    def fid(checkpoint: Path, steps: int | None = None) -> dict:
        return evaluate(checkpoint, num=num_eval, seed=seed, steps=steps, progress=progress)

    started = time.perf_counter()
    summary = run_training(config, run_dir, progress=progress)
    train_minutes = (time.perf_counter() - started) / 60
    rows = load_metrics(run_dir / "metrics.jsonl")
    extra, curve_steps = {}, None
    flat = config.schedule.stages == 1 and base.schedule.stages > 1
    if flat:
        pyramid = pyramid_counterpart(config, base)
        curve_steps = extra["equal_sampling_compute_steps"] = equal_compute_steps(config, pyramid)
    curve = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])):
        step = int(step_dir.name[5:])
        result = fid(step_dir, curve_steps)
        matched = result.get("caption_match") or {}
        curve.append({"step": step, "minutes": training_minutes_at(rows, step),
                      "fid": result["fid_efficientnet_lite0"], "digit_accuracy": result.get("digit_accuracy"),
                      "caption_match": matched.get("top1"), "caption_match_rank": matched.get("rank_mean")})
    if flat:
        n = sum(pyramid.sample.steps_per_stage(pyramid.schedule.stages))
        extra["equal_sampling_steps"] = {"steps": n, "fid": fid(run_dir, n)["fid_efficientnet_lite0"]}
    for n in eval_steps:
        extra[f"fid_steps{n}"] = fid(run_dir, n)["fid_efficientnet_lite0"]
    if eval_independent_jumps and config.schedule.stages > 1:
        with independent_jump_noise():
            extra["fid_independent_jumps"] = fid(run_dir)["fid_efficientnet_lite0"]
    return {"seed": seed, "steps": summary["steps"], "train_minutes": train_minutes,
            "fid_efficientnet_lite0": curve[-1]["fid"], "digit_accuracy": curve[-1]["digit_accuracy"], "curve": curve,
            **extra, **throughput(run_dir, config),
            "run_dir": str(run_dir)}


def summarise(runs: dict[str, list[dict]], header: dict) -> dict:
    """Means over seeds per arm, the best arm, and the minutes each of flat and the best pyramid arm needs to reach
    the other's final FID (mean curves)."""
    rows = {}
    for name, r in runs.items():
        rows[name] = {"runs": r, "fid_mean": statistics.mean(x["fid_efficientnet_lite0"] for x in r),
                      "curve_mean": mean_curve(r)}
        for key in ("caption_match", "caption_match_rank"):
            if any(p.get(key) is not None for x in r for p in x["curve"]):
                rows[name][f"{key}_curve_mean"] = mean_curve(r, key)
        accuracies = [x["digit_accuracy"] for x in r if x.get("digit_accuracy") is not None]
        if accuracies:
            rows[name]["digit_accuracy_mean"] = statistics.mean(accuracies)
        if all("equal_sampling_steps" in x for x in r):
            rows[name]["fid_equal_sampling_steps_mean"] = statistics.mean(x["equal_sampling_steps"]["fid"] for x in r)
    result = {**header, "variants": rows, "best_fid": min(rows, key=lambda n: rows[n]["fid_mean"])}
    flat = [n for n, r in runs.items() if all("equal_sampling_compute_steps" in x for x in r)]
    pyramid = [n for n in rows if n not in flat]
    if flat and pyramid:
        best_flat = min(flat, key=lambda n: rows[n]["fid_mean"])
        best_pyramid = min(pyramid, key=lambda n: rows[n]["fid_mean"])
        f_curve, p_curve = rows[best_flat]["curve_mean"], rows[best_pyramid]["curve_mean"]
        result["crossing"] = {
            "flat": best_flat, "pyramid": best_pyramid,
            "flat_final_fid": f_curve[-1][1], "pyramid_final_fid": p_curve[-1][1],
            "flat_final_minutes": f_curve[-1][0], "pyramid_final_minutes": p_curve[-1][0],
            "pyramid_minutes_to_flat_final": minutes_to_reach(p_curve, f_curve[-1][1]),
            "flat_minutes_to_pyramid_final": minutes_to_reach(f_curve, p_curve[-1][1]),
        }
        # Caption match is timed by the mean rank of each sample's own picture, not by top-1: early in training
        # every arm's top-1 can be 0, and a crossing of two zeros would say nothing.
        f_rank, p_rank = (rows[n].get("caption_match_rank_curve_mean") for n in (best_flat, best_pyramid))
        if f_rank and p_rank:
            f_top1, p_top1 = (rows[n].get("caption_match_curve_mean") or [(None, None)] for n in (best_flat, best_pyramid))
            result["caption_match_crossing"] = {
                "flat": best_flat, "pyramid": best_pyramid, "timed_by": "caption_match_rank (lower is better)",
                "flat_final_rank": f_rank[-1][1], "pyramid_final_rank": p_rank[-1][1],
                "flat_final_top1": f_top1[-1][1], "pyramid_final_top1": p_top1[-1][1],
                "flat_final_minutes": f_rank[-1][0], "pyramid_final_minutes": p_rank[-1][0],
                "pyramid_minutes_to_flat_final": minutes_to_reach(p_rank, f_rank[-1][1]),
                "flat_minutes_to_pyramid_final": minutes_to_reach(f_rank, p_rank[-1][1]),
            }
    return result


def merge_studies(studies: list[dict]) -> dict:
    """One study from several runs of the same config and minutes (e.g. seed 0 one day, seed 1 the next): the runs of
    each arm (and arms only one has) together, summarised again."""
    first = studies[0]
    for other in studies[1:]:
        for key in ("config", "overrides", "minutes_per_variant", "eval_samples"):
            if other.get(key) != first.get(key):
                raise ValueError(f"cannot merge studies with different {key}: {first.get(key)!r} vs {other.get(key)!r}")
    runs: dict[str, list[dict]] = {}
    arms: dict[str, list[str]] = {}
    for study in studies:
        for name, row in study["variants"].items():
            if name in arms and study["arms"][name] != arms[name]:
                raise ValueError(f"cannot merge arm {name!r}: its settings differ between the studies")
            arms[name] = study["arms"][name]
            runs.setdefault(name, []).extend(row["runs"])
    header = {k: v for k, v in first.items() if k not in ("variants", "best_fid", "crossing", "seeds", "arms")}
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    return summarise(runs, {**header, "seeds": seeds, "arms": arms})


METRIC_LABELS = {"fid": "FID (EfficientNet-Lite0), lower is better",
                 "caption_match_rank": "caption-match mean rank, lower is better",
                 "caption_match": "caption match top-1, higher is better"}


def plot_score_curves(studies: list[dict], path: str | Path, titles: list[str] | None = None, metric: str = "fid") -> None:
    """A score (FID by default, or a caption-match figure) against training minutes, every arm's mean over seeds
    (each seed faint), one panel per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_key = "curve_mean" if metric == "fid" else f"{metric}_curve_mean"
    fig, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies), 3.8), squeeze=False)
    for i, (ax, study) in enumerate(zip(axes[0], studies)):
        for name, row in study["variants"].items():
            if not row.get(mean_key):
                raise ValueError(f"{titles[i] if titles else study['config']}: arm {name} has no {metric} curve; "
                                 f"plot one of {sorted(METRIC_LABELS)} its runs recorded")
            style = "--" if name.startswith("flat") else "-"
            line, = ax.plot(*zip(*row[mean_key]), style, marker="o", label=name)
            for run in row["runs"]:
                points = [p for p in run["curve"] if p.get(metric) is not None]
                ax.plot([p["minutes"] for p in points], [p[metric] for p in points], style, color=line.get_color(),
                        alpha=0.25)
        ax.set_title(titles[i] if titles else Path(str(study["config"])).stem)
        ax.set_xlabel("training minutes")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def format_study(q: dict) -> str:
    """The study as text: per arm the mean FID, per seed FID / steps / throughput, the FID curve and, for flat, its
    FID at the pyramid's sampling compute; then where flat and the best pyramid arm reach each other's final FID."""
    lines = [f"quality at equal compute, {q.get('config', 'the demo')} ({q['minutes_per_variant']:g} min each, "
             f"seeds {q['seeds']}, {q['eval_samples']} samples per FID)" + (
                 f", {q['machine']['cpu']}" if "machine" in q else "") + ":"]
    for name, row in q["variants"].items():
        def run_text(r):
            accuracy = f" / {100 * r['digit_accuracy']:.1f}%" if r.get("digit_accuracy") is not None else ""
            speed = (f", {r['samples_per_s']:.1f} samples/s, {r['visual_tokens_per_s']:.0f} visual tok/s, "
                     f"{r['gflop_per_step']:.1f} GFLOP/step" if "visual_tokens_per_s" in r else "")
            other_steps = "".join(f", {k[9:]} Euler steps/stage {v:.0f}" for k, v in r.items() if k.startswith("fid_steps"))
            if "fid_independent_jumps" in r:
                other_steps += f", without block noise {r['fid_independent_jumps']:.0f}"
            return f"{r['fid_efficientnet_lite0']:.0f}{accuracy} ({r['steps']} steps{speed}{other_steps})"

        accuracy = f"  digit accuracy {100 * row['digit_accuracy_mean']:5.1f}%" if "digit_accuracy_mean" in row else ""
        equal = (f" at the pyramid's sampling compute ({row['runs'][0]['equal_sampling_compute_steps']} steps); "
                 f"{row['fid_equal_sampling_steps_mean']:.1f} at its step count "
                 f"({row['runs'][0]['equal_sampling_steps']['steps']} steps)" if "fid_equal_sampling_steps_mean" in row
                 else "")
        lines.append(f"  {name:<18} FID {row['fid_mean']:7.1f}{equal}{accuracy}  (per seed: "
                     f"{', '.join(run_text(r) for r in row['runs'])})")
        lines.append(f"  {'':<18} curve: " + ", ".join(f"{m:.1f} min {f:.0f}" for m, f in row["curve_mean"]))
    if "crossing" in q:
        c = q["crossing"]

        def reach(minutes):
            return "never" if minutes is None else f"{minutes:.1f} min"

        lines.append(f"  {c['pyramid']} reaches {c['flat']}'s final FID {c['flat_final_fid']:.0f} at "
                     f"{reach(c['pyramid_minutes_to_flat_final'])} (flat: {c['flat_final_minutes']:.1f} min); "
                     f"{c['flat']} reaches {c['pyramid']}'s final FID {c['pyramid_final_fid']:.0f} at "
                     f"{reach(c['flat_minutes_to_pyramid_final'])} (pyramid: {c['pyramid_final_minutes']:.1f} min)")
    return "\n".join(lines)
