#!/usr/bin/env bash
# On the GPU machine (make bench-gpu): install the wheels make bench-gpu-wheels put in .whl/
# (carried there) into /tmp/site, then run bench/gpu.py. Results: $OUT/gpu.json when the device
# tool's $OUT is set, else bench/results/gpu-<device>.json. BUDGET: seconds for its sections.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
args=(--budget "${BUDGET:-450}")
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT/gpu.json"); fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
exec "$PY" -m bench.gpu "${args[@]}"
