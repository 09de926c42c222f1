#!/usr/bin/env bash
# The equal-compute study across sizes, back to back (about two hours on 2 CPU cores; run it on an otherwise idle
# machine): flat vs 25/50/25 at 32 px (the MNIST demo), 64 px and 128 px (the emoji demo), SEEDS seeds each, every
# run scored at CHECKPOINTS checkpoints; JSON to benchmarks/results/study-<size>-<date>-<host>.json, then the FID
# against minutes plot to docs/study-fid-minutes.png. SIZES picks sizes (default "32px 64px 128px"); EXTRA adds settings
# to every run (e.g. EXTRA="--arm flat-lr6e-3 flat train.lr=6e-3" for a learning-rate search's winner).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp="$(date +%Y%m%d-%H%M)-$(hostname)"
seeds="${SEEDS:-0 1}"
run() {  # size minutes checkpoints num_eval pyraflow-args...
  local size=$1 minutes=$2 checkpoints=$3 num=$4; shift 4
  local out="benchmarks/results/study-${size}-${stamp}.json"
  local tmp; tmp="$(mktemp "$out.XXXX")"
  pyraflow bench --full --only-study --json --minutes "$minutes" --seeds $seeds --checkpoints "$checkpoints" \
    --num-eval "$num" --out "runs/study-$size" --variants 25-50-25 flat "$@" > "$tmp"
  mv "$tmp" "$out"
  echo "wrote $out"
  results+=("$out")
}
results=()
titles=()
sizes="${SIZES:-32px 64px 128px}"
# shellcheck disable=SC2086  # EXTRA is split into arguments on purpose
for size in $sizes; do
  case $size in
    32px) run 32px "${MINUTES_32:-5}" 3 200 ${EXTRA:-}; titles+=("32 px (MNIST)") ;;
    64px) run 64px "${MINUTES_64:-6}" 3 200 --config configs/emoji.yaml ${EXTRA:-}; titles+=("64 px (emoji)") ;;
    128px) run 128px "${MINUTES_128:-8}" 3 100 --config configs/emoji.yaml --set data.image_size=128 ${EXTRA:-}
           titles+=("128 px (emoji)") ;;
    *) echo "unknown size $size (32px, 64px or 128px)" >&2; exit 2 ;;
  esac
done
python benchmarks/plot_study.py docs/study-fid-minutes.png "${results[@]}" --titles "${titles[@]}"
