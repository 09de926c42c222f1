#!/usr/bin/env bash
# Record `pyraflow bench` on this machine: JSON to benchmarks/results/bench-<date>-<host>.json.
# SCALES="2 4" adds the layouts at larger latents. Run it on an otherwise idle machine; figures are medians of steps alternated across variants.
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/bench-$(date +%Y%m%d-%H%M)-$(hostname).json"
pyraflow bench --json --steps "${STEPS:-10}" --warmup 2 ${SCALES:+--scales $SCALES} > "$out"
echo "wrote $out"
