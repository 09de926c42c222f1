"""Add caption match to a finished quality study: every checkpoint of every run sampled from training captions
(flat at the pyramid's sampling compute, as its FID was), scored, and the study summarised again.

    python benchmarks/rescore_caption_match.py STUDY.json OUT.json [--num 100] [--threads N] [--points 0 3 7]

The runs' checkpoints must still be where the study's JSON says. OUT is rewritten after every run, so an
interrupted rescoring keeps what it finished.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from pyraflow.bench.study import summarise
from pyraflow.evaluation import caption_match, spread, training_pictures
from pyraflow.sample import load_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("study", help="JSON written by pyraflow bench --full --json (or a merged one)")
parser.add_argument("out", help="the JSON to write: the study with caption match in every curve point")
parser.add_argument("--num", type=int, default=100, help="samples per checkpoint (default 100)")
parser.add_argument("--threads", type=int, help="torch CPU threads")
parser.add_argument("--points", type=int, nargs="+", help="only these checkpoints of each run's curve (0 = first, -1 = "
                    "last); the others keep what STUDY has")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
document = json.loads(Path(args.study).read_text())
quality = document["quality"]
reference = None


def chosen(curve: list[dict]) -> list[dict]:
    return curve if args.points is None else [curve[i] for i in dict.fromkeys(i % len(curve) for i in args.points)]


jobs = [point for row in quality["variants"].values() for run in row["runs"] for point in chosen(run["curve"])]
with tqdm(total=len(jobs), desc="checkpoints") as bar:
    for name, row in quality["variants"].items():
        for run in row["runs"]:
            steps = run.get("equal_sampling_compute_steps")
            for point in chosen(run["curve"]):
                pipeline = load_pipeline(Path(run["run_dir"]) / "checkpoints" / f"step-{point['step']}", "cpu")
                if reference is None:
                    reference = training_pictures(pipeline)
                pictures, captions = reference
                prompts = spread(captions, args.num)
                step_list = [steps] * pipeline.schedule.num_stages if steps else None
                samples = torch.cat([pipeline.generate(prompts[i : i + 50], seed=run["seed"] + i, steps=step_list)[0]
                                     for i in range(0, len(prompts), 50)])[:, :, 0]
                matched = caption_match(samples, prompts, pictures, captions)
                point["caption_match"], point["caption_match_top5"] = matched["top1"], matched["top5"]
                point["caption_match_rank"] = matched["rank_mean"]
                quality["caption_match"] = {k: matched[k] for k in ("chance_top1", "chance_top5", "chance_rank_mean",
                                                                     "reference")}
                bar.update()
            Path(args.out).write_text(json.dumps(document, indent=2))
header = {k: v for k, v in quality.items() if k not in ("variants", "best_fid", "crossing", "caption_match_crossing")}
summary = summarise({name: row["runs"] for name, row in quality["variants"].items()}, header)
summary["caption_match"]["num_samples"] = args.num
document["quality"] = summary
Path(args.out).write_text(json.dumps(document, indent=2))
for name, row in summary["variants"].items():
    curve = ", ".join(f"{100 * c:.1f}% at {m:.1f}" for m, c in row["caption_match_curve_mean"])
    finals = [r["curve"][-1]["caption_match"] for r in row["runs"]]
    print(f"{name}: final {' / '.join(f'{100 * f:.1f}%' for f in finals)} (mean {100 * statistics.mean(finals):.1f}%); "
          f"mean curve {curve}")
    for run in row["runs"]:
        ranks = ", ".join(f"{p['caption_match_rank']:.0f} at {p['minutes']:.1f}" for p in run["curve"]
                          if p.get("caption_match_rank") is not None)
        print(f"  seed {run['seed']}: mean rank of the caption's own picture {ranks}")
print(json.dumps(summary.get("caption_match_crossing"), indent=2))
