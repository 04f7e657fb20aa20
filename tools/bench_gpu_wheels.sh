#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the GPU image (Python 3.12 with torch and transformers, but
# no deepspeed, open_clip or webdataset: /work/.library/device/KINDS.md), at the versions of
# requirements/lock.txt and requirements/reference.txt, into .whl/ (git-ignored). Carry .whl to
# the GPU machine and run tools/bench_gpu.sh there (make bench-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=.whl
# what the image lacks: deepspeed and its hjson/pydantic, open_clip and its ftfy, webdataset
# and its braceexpand, and the reference OpenFlamingo with its einops-exts; einops too (the
# image has it, a bare Python 3.12 + torch + transformers venv has not: the smoke failed there).
# What the wheels rely on from the image (tools/bench_gpu.sh checks before it runs): torch,
# torchvision, transformers, tokenizers, safetensors, huggingface_hub, numpy, pillow, pyyaml,
# regex, tqdm, packaging, psutil (deepspeed), msgpack (deepspeed), py-cpuinfo (deepspeed).
LOCKED="deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
        open-clip-torch ftfy wcwidth webdataset braceexpand einops"
REFERENCE="open-flamingo einops-exts"
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS="$PLATFORMS --platform $p"; done
pin() {  # pin NAME FILE: NAME==VERSION as FILE gives it
  grep -ioE "^$1==[^ ;]+" "$2" || { echo "bench_gpu_wheels: $1 is not pinned in $2" >&2; exit 1; }
}
rm -rf "$DEST"
mkdir -p "$DEST"
for spec in $(for n in $LOCKED; do pin "$n" requirements/lock.txt; done) \
            $(for n in $REFERENCE; do pin "$n" requirements/reference.txt; done); do
  if ! "$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
       --implementation cp $PLATFORMS -d "$DEST" "$spec" 2>/dev/null; then
    # a source-only release (deepspeed): a pure-Python wheel built here, no ops compiled
    DS_BUILD_OPS=0 "$PIP" wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$spec"
  fi
done
ls -la "$DEST"
du -sh "$DEST"
