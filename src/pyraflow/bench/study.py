"""``pyraflow bench --full``: sample quality at equal compute.

A config's model (the MNIST demo's by default; ``--config`` another, e.g. configs/emoji.yaml) is trained for the
same wall time (the steps that fit in it, timed first) with four stage mixes — uniform, 25/50/25, a progressive mix
(50/30/20 moving linearly to 25/50/25 over the first 500 steps) and flat single-stage flow matching at full
resolution — then each run is evaluated with ``pyraflow eval`` (FID (EfficientNet-Lite0), and digit accuracy for
digits). Everything but the mix (and, for flat, the stage count) stays as in the config; flat sampling gets the
pyramid's total number of Euler steps. Each run also reports its throughput (samples and visual tokens per second,
model FLOPs per step) and its last per-stage losses, from its metrics.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

STUDY_VARIANTS = {
    "uniform": ["batching.mix.ratio=uniform"],
    "25-50-25": ["batching.mix.ratio=25-50-25"],
    "progressive": ["batching.mix.kind=linear",
                    "batching.mix.points=[{step: 0, ratio: [0.5, 0.3, 0.2]}, {step: 500, ratio: 25-50-25}]"],
    "flat": ["schedule.stages=1", "batching.mix.ratio=uniform", "sample.steps=30"],
}


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


def throughput(run_dir: Path, config) -> dict:
    """Samples and visual tokens per second, model FLOPs per step and the last logged per-stage losses of a run,
    from its metrics.jsonl (the logged steps after the first, so start-up and compilation are left out)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][1:]
    if not rows:
        return {}
    per_stage = visual_tokens_per_stage(config)
    seconds = sum(r["seconds"] for r in rows)
    samples = [sum(r["samples_stage"]) for r in rows]
    visual = [sum(n * t for n, t in zip(r["samples_stage"], per_stage)) for r in rows]
    last = rows[-1]
    return {"samples_per_s": sum(samples) / seconds, "visual_tokens_per_s": sum(visual) / seconds,
            "step_s_logged": seconds / len(rows),
            "stage_loss_last": {k: last[f"loss_stage{k}"] for k in range(len(per_stage)) if f"loss_stage{k}" in last}}


def quality_study(out_dir: str | Path, minutes: float = 10.0, seeds: list[int] | tuple[int, ...] = (0,),
                  num_eval: int = 200, progress: bool = True, config_path: str | None = None,
                  variants: list[str] | None = None) -> dict:
    """Train and evaluate every variant (or those named) of the config at ``config_path`` (None: the demo) for
    ``minutes`` with each seed (seed-major, so an interrupted study still holds whole seeds); report each run and the
    mean over seeds."""
    from pyraflow.config import load_config
    from pyraflow.evaluation import evaluate
    from pyraflow.train import run_training

    names = variants or list(STUDY_VARIANTS)
    unknown = [n for n in names if n not in STUDY_VARIANTS]
    if unknown:
        raise ValueError(f"unknown study variant(s) {unknown}; choose from {', '.join(STUDY_VARIANTS)}.")
    out_dir = Path(out_dir)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            settings = STUDY_VARIANTS[name] + [f"train.seed={seed}", f"batching.seed={seed}", "train.sample_every=0",
                                               "train.checkpoint_every=0"]
            run_dir = out_dir / f"seed{seed}" / name
            steps = steps_in(load_config(config_path, settings), minutes, out_dir / f"seed{seed}" / f"{name}-calibration")
            config = load_config(config_path, settings + [f"train.steps={steps}",
                                                          f"train.time_limit_minutes={TIME_LIMIT_SLACK * minutes}"])
            started = time.perf_counter()
            summary = run_training(config, run_dir, progress=progress)
            result = evaluate(run_dir, num=num_eval, seed=seed, progress=progress)
            runs[name].append({"seed": seed, "steps": summary["steps"], "train_minutes": (time.perf_counter() - started) / 60,
                               "fid_efficientnet_lite0": result["fid_efficientnet_lite0"],
                               "digit_accuracy": result.get("digit_accuracy"),
                               "classifier_heldout_accuracy": result.get("classifier_heldout_accuracy"),
                               **throughput(run_dir, config), "run_dir": str(run_dir)})
    rows = {}
    for name, r in runs.items():
        rows[name] = {"runs": r, "fid_mean": statistics.mean(x["fid_efficientnet_lite0"] for x in r)}
        accuracies = [x["digit_accuracy"] for x in r if x["digit_accuracy"] is not None]
        if accuracies:
            rows[name]["digit_accuracy_mean"] = statistics.mean(accuracies)
    best = min(rows, key=lambda n: rows[n]["fid_mean"])
    return {"config": config_path or "built-in defaults (configs/mnist.yaml)", "minutes_per_variant": minutes,
            "seeds": list(seeds), "eval_samples": num_eval, "variants": rows, "best_fid": best}
