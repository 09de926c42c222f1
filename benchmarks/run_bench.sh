#!/usr/bin/env bash
# Record `pyraflow bench` on this machine: JSON to benchmarks/results/bench-<date>-<time>-<host>.json.
# SCALES="2 4" adds the layouts at larger latents. Run it on an otherwise idle machine; figures are medians
# of steps alternated across variants. The JSON goes to a temporary file first, so a failed run leaves no
# empty or partial result behind.
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/bench-$(date +%Y%m%d-%H%M)-$(hostname).json"
tmp="$(mktemp "$out.XXXX")"
trap 'rm -f "$tmp"' EXIT
pyraflow bench --json --steps "${STEPS:-10}" --warmup 2 ${SCALES:+--scales $SCALES} > "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
