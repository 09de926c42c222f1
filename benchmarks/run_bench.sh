#!/usr/bin/env bash
# Record `pyraflow bench` on this machine: JSON to benchmarks/results/bench-<date>-<host>.json.
# Run it on an otherwise idle machine; figures are medians of steps alternated across variants.
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/bench-$(date +%Y%m%d)-$(hostname).json"
pyraflow bench --json --steps "${STEPS:-10}" --warmup 2 > "$out"
echo "wrote $out"
