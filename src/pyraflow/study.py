"""``pyraflow bench --full``: sample quality at equal compute.

The MNIST demo's model is trained for the same wall time with four stage mixes — uniform, 25/50/25,
a progressive mix (50/30/20 moving linearly to 25/50/25 over the first 500 steps) and flat
single-stage flow matching at full resolution — then each run is evaluated with ``pyraflow eval``
(FID (EfficientNet-Lite0) and digit accuracy). Everything but the mix (and, for flat, the stage count)
stays as in the demo; flat sampling gets the pyramid's total number of Euler steps.
"""

from __future__ import annotations

import time
from pathlib import Path

STUDY_VARIANTS = {
    "uniform": ["batching.mix.ratio=uniform"],
    "25-50-25": ["batching.mix.ratio=25-50-25"],
    "progressive": ["batching.mix.kind=linear",
                    "batching.mix.points=[{step: 0, ratio: [0.5, 0.3, 0.2]}, {step: 500, ratio: 25-50-25}]"],
    "flat": ["schedule.stages=1", "batching.mix.ratio=uniform", "sample.steps=30"],
}


def quality_study(out_dir: str | Path, minutes: float = 10.0, seed: int = 0, num_eval: int = 200,
                  progress: bool = True) -> dict:
    from pyraflow.config import load_config
    from pyraflow.evaluation import evaluate
    from pyraflow.training import run_training

    out_dir = Path(out_dir)
    rows = {}
    for name, overrides in STUDY_VARIANTS.items():
        config = load_config(None, overrides + [f"train.seed={seed}", "train.steps=1000000",
                                                f"train.time_limit_minutes={minutes}", "train.sample_every=0",
                                                "train.checkpoint_every=0"])
        started = time.perf_counter()
        summary = run_training(config, out_dir / name, progress=progress)
        result = evaluate(out_dir / name, num=num_eval, seed=seed, progress=progress)
        rows[name] = {"steps": summary["steps"], "train_minutes": (time.perf_counter() - started) / 60,
                      "fid_efficientnet_lite0": result["fid_efficientnet_lite0"], "digit_accuracy": result["digit_accuracy"],
                      "classifier_heldout_accuracy": result["classifier_heldout_accuracy"], "run_dir": str(out_dir / name)}
    best = min(rows, key=lambda n: rows[n]["fid_efficientnet_lite0"])
    return {"minutes_per_variant": minutes, "seed": seed, "eval_samples": num_eval, "variants": rows,
            "best_fid": best}
