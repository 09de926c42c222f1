"""Plot FID against training minutes from `pyraflow bench --full --json` results, one panel per size.

    python benchmarks/plot_study.py OUT.png RESULT.json [RESULT.json ...] [--titles "32 px" "64 px" ...]
                                    [--metric fid|caption_match_rank|caption_match]

RESULT may join several results of one config with '+' (e.g. seed 0 and seed 1 run apart): they are merged into one
panel, and the merged study is written beside OUT as OUT-<n>.json.
"""

import argparse
import json
from pathlib import Path

from pyraflow.bench.study import METRIC_LABELS, format_study, merge_studies, plot_score_curves

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", help="the PNG to write")
parser.add_argument("results", nargs="+", help="JSON written by pyraflow bench --full --json (A.json+B.json merges)")
parser.add_argument("--titles", nargs="+", default=None, help="one panel title per result")
parser.add_argument("--metric", default="fid", choices=sorted(METRIC_LABELS), help="the score to plot (default fid)")
args = parser.parse_args()
if args.titles and len(args.titles) != len(args.results):
    parser.error(f"{len(args.titles)} titles for {len(args.results)} results; give one per result")
studies = []
for i, spec in enumerate(args.results):
    parts = [json.loads(Path(p).read_text())["quality"] for p in spec.split("+")]
    study = merge_studies(parts) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        merged = Path(args.out).with_name(f"{Path(args.out).stem}-{i}.json")
        merged.write_text(json.dumps({"quality": study}, indent=2))
        print(f"wrote {merged}")
    print(format_study(study))
    studies.append(study)
plot_score_curves(studies, args.out, args.titles, args.metric)
print(f"wrote {args.out}")
