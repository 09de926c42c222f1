"""Each rank's host memory at set-up and while saving, this checkout against an older one, side by side.

    python benchmarks/startup_against.py OLD_SRC [--rounds 2] > result.json

OLD_SRC is the ``src`` folder of another pyraflow checkout (e.g. a ``git worktree`` at an earlier commit). The
218 M-parameter model directory of ``pyraflow bench --startup`` is written once; then, alternating round by round,
a 2-rank FSDP2 job sets up from it, trains a step and saves a checkpoint (pyraflow.bench.startup's rank script),
once importing this checkout and once OLD_SRC. Prints JSON: each job's per-rank figures and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from tqdm import tqdm

from pyraflow.bench.startup import LARGE, RUN, launch, write_random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_src", type=Path, help="the src folder of the checkout to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (args.old_src / "pyraflow").is_dir():
        parser.error(f"{args.old_src} holds no pyraflow package; pass the src folder of a pyraflow checkout")
    this_src = str(Path(__file__).resolve().parents[1] / "src")
    sides = {"this": this_src, "old": str(args.old_src.resolve())}
    jobs: dict[str, list] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        parameters = write_random_model(model, RUN + LARGE)
        for round_ in tqdm(range(args.rounds), desc="rounds"):
            for side, src in sides.items():
                os.environ["PYTHONPATH"] = src  # the ranks import pyraflow from here
                jobs[side].append(launch(Path(tmp) / f"{side}{round_}", 2, RUN + LARGE + [f"train.init_from={model}"]))
    fp32_mb = 4 * parameters / 2**20
    summary = {}
    for side, runs in jobs.items():
        summary[side] = {key: [statistics.median(run[rank][key] for run in runs) for rank in range(2)]
                         for key in ("set_up_peak_mb", "save_mb")}
        summary[side]["save_in_fp32_models"] = [m / fp32_mb for m in summary[side]["save_mb"]]
    print(json.dumps({"parameters": parameters, "fp32_model_mb": fp32_mb, "old_src": sides["old"], "jobs": jobs,
                      "median": summary}, indent=2))


if __name__ == "__main__":
    main()
