#!/usr/bin/env bash
# On the GPU machine (make bench-gpu): install the wheels make bench-gpu-wheels put in .whl/
# (carried there) into /tmp/site, then run bench/gpu.py. Results: $OUT/gpu.json when the device
# tool's $OUT is set, else bench/results/gpu-<device>.json. BUDGET: seconds for its measurements
# (default bench.gpu's, 300).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
# what the carried wheels rely on from the image (tools/bench_gpu_wheels.sh): say what is
# missing at once rather than after the first measurements
"$PY" - <<'PYEOF' || exit 1
import importlib.util, sys
needed = ["torch", "torchvision", "transformers", "tokenizers", "safetensors", "huggingface_hub",
          "numpy", "PIL", "yaml", "regex", "tqdm", "packaging", "psutil", "msgpack", "cpuinfo",
          "einops", "deepspeed", "open_clip", "webdataset"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"bench_gpu: missing here: {missing}; carry their wheels (.whl/)")
PYEOF
args=()
if [ -n "${BUDGET:-}" ]; then args+=(--budget "$BUDGET"); fi
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT/gpu.json"); fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
exec "$PY" -m bench.gpu "${args[@]}"
