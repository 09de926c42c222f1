#!/usr/bin/env bash
# GPU acceptance check, for the day a CUDA GPU is at hand (about 8 minutes on one GPU). It needs a Python with a
# CUDA build of torch >= 2.6 and the usual packages of a PyTorch image (numpy, PyYAML, einops, safetensors, tqdm,
# transformers, tensorboard, matplotlib, Pillow, pytest); it downloads nothing and runs pyraflow from src/.
#   1. the CUDA tests (tests/test_cuda.py): flex and flash against the per-segment oracle, forward and backward,
#      with and without temporal causality; the model packed vs alone on flex; sampling that stays on the device;
#      bf16 training with FSDP2 under torchrun on one rank; a training step under CUDA's sync debug mode (no host
#      waits); compiled blocks against eager; sampling offloaded in bf16; with two GPUs, every architecture split
#      over both (sequence parallelism on NCCL's all_to_all) against the whole model (skipped on one GPU, saying so);
#   2. `pyraflow bench --json --scales 4` on CUDA: ms per step and visual tokens/s per backend (grouped, flex, flash
#      when installed, the baselines), MFU against a bf16 matmul peak measured in the same run, the step eager and
#      with compiled blocks (Triton) with the compilation time and recompilations, the layouts at latents x4, into benchmarks/results/bench-<date>-<time>-<host>-cuda.json.
# With OUT set (the device tool), the log and the JSON are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
log="$(mktemp)"
trap 'if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/gpu_check.log"; fi' EXIT
{
  echo "== $(date -Is) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$py" -c "import pyraflow.attention as a; print('flash-attn installed:', a.flash_available())"
  "$py" -c "import torch; n = torch.cuda.device_count(); print(n, 'GPU(s):', 'the sequence-parallel check runs' if n >= 2 else 'the sequence-parallel check (two GPUs) is skipped')"
  echo "== CUDA tests"
  timeout 300 "$py" -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda.py
  echo "== bench"
  mkdir -p benchmarks/results
  out="benchmarks/results/bench-$(date +%Y%m%d-%H%M)-$(hostname)-cuda.json"
  tmp="$(mktemp)"
  timeout 300 "$py" -m pyraflow bench --json --scales 4 > "$tmp"
  mv "$tmp" "$out"
  if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
  "$py" -c "
import json, sys
r = json.load(open('$out'))
for name, v in r['variants'].items():
    print(f\"{name:<30} {v['precision']:<5} {v['ms_per_step']:8.2f} ms/step {v['visual_tokens_per_s']:12.0f} visual tok/s\")
m = r['mfu']
print(f\"bf16 matmul peak {m['bf16_peak_gflops'] / 1000:.0f} TFLOP/s; grouped at {100 * m['fraction_of_bf16_peak']:.1f}% of it\")
for p in r['compile'].get('precisions', []):
    c = r['compile'][p]
    print(f\"compiled {p}: {c['compiled']['ms_per_step']:.2f} ms vs eager {c['eager']['ms_per_step']:.2f} ({c['speedup']:.2f}x), compile {c['compile_s']:.0f} s\")
print('compile:', r['compile'].get('skipped', 'timed'), '| recompilations over the stability batches:', r['stability'].get('compiled'))
for s, e in r.get('scaling', {}).get('scales', {}).items():
    print(f\"latents x{s}: pyraflow {e['pyraflow']['ms_per_step']:.1f} ms; reference rows {e['reference_columns']['pyraflow_speedup']:.2f}x\")
"
  echo "wrote $out"
} 2>&1 | tee "$log"
