#!/usr/bin/env bash
# The parity table: every fixture case recorded from the reference's own code, the largest |difference| of
# pyraflow's result, and its tolerance. Runs the parity tests with PYRAFLOW_PARITY set (tests/conftest.py records
# each case), then prints the table as markdown. Usage: benchmarks/parity.sh [out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/parity-$(date +%Y%m%d)-$(hostname -s).json}"
PYRAFLOW_PARITY="$PWD/$out" python -m pytest -q -p no:cacheprovider \
  tests/test_interop.py tests/interop tests/sample/test_released.py -k "not bad and not refused and not named"
python - "$out" <<'PY'
import json, sys
cases = json.load(open(sys.argv[1]))
print(f"\n{len(cases)} cases, {sys.argv[1]}\n\n| case | largest abs difference | tolerance |\n|---|---|---|")
for case, entry in cases.items():
    print(f"| {case} | {entry['max_abs_diff']:.1e} | {entry['tolerance']:g} |")
PY
