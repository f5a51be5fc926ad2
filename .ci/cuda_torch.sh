#!/usr/bin/env bash
# The CUDA build as a GPU user makes it, on this GPU-less machine: a fresh venv with the CUDA build of torch 2.13.0
# from PyPI (CUDA 13.0; pip's configured find-links would pick the local CPU wheel, so that one install reads no
# pip configuration), the CUDA 13 toolkit found behind the nvcc wrapper on PATH, and the README's
# `pip install --no-build-isolation -e .` with FASTAVG_BUILD_CUDA=1 (a failed CUDA part fails it). Then: the CUDA
# dispatch keys are registered, the extension holds sm_75, sm_80 and sm_90 cubins and compute_90 PTX, and the CPU
# tests pass against that build. Builds in a copy of the checkout (the checkout's own extension is left alone) and
# deletes the venv and the copy. About 2.6 GB of downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
started=$SECONDS
elapsed() { echo "cuda_torch: ... $((SECONDS - started)) s"; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir "$work/src"
tar cf - --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' . | tar xf - -C "$work/src"
"$PYTHON" -m venv "$work/venv"
python="$work/venv/bin/python"
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$python" -m pip install -q --no-cache-dir \
  torch==2.13.0
"$python" -m pip install -q setuptools ninja pytest
"$python" -c 'import torch; assert torch.version.cuda, torch.__version__; print("cuda_torch: torch", torch.__version__, "CUDA", torch.version.cuda)'
elapsed

cd "$work/src"
FASTAVG_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-4}" "$python" -m pip install -v --no-build-isolation -e . >"$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log" >&2; echo "cuda_torch: FAILED: the build" >&2; exit 1; }
grep -E "^ *fastavg:" "$work/build.log" || true
elapsed

(cd / && "$python" - <<'PY'
import torch, fastavg
from fastavg import _backends
print("cuda_torch:", _backends.extension_origin())
for op in ("adam_step_", "sgd_step_", "average_"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastavg::{op}", key), (op, key)
status = fastavg.backend_status()
assert status["cpu"] == "" and "no CUDA device is visible" in status["cuda"], status
print("cuda_torch: CPU and CUDA kernels registered for every op")
PY
)
library=(fastavg/_C*.so)
# cuobjdump: $CUOBJDUMP, the toolkit's, PATH's, or the one Triton ships (toolkits without it exist).
cuobjdump="${CUOBJDUMP:-}"
for candidate in "$("$python" -c 'from fastavg import _build; print(_build.find_cuda_toolkit()[0] or "")')/bin/cuobjdump" \
  "$(command -v cuobjdump || true)" \
  "$("$python" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')"; do
  if [[ -z "$cuobjdump" && -x "$candidate" ]]; then cuobjdump="$candidate"; fi
done
elfs="$("$cuobjdump" --list-elf "${library[0]}")"
ptx="$("$cuobjdump" --list-ptx "${library[0]}")"
for arch in sm_75 sm_80 sm_90; do
  grep -q "\.$arch\.cubin" <<<"$elfs" || { echo "cuda_torch: FAILED: no $arch cubin in ${library[0]}" >&2; exit 1; }
done
grep -q "sm_90\.ptx" <<<"$ptx" || { echo "cuda_torch: FAILED: no compute_90 PTX in ${library[0]}" >&2; exit 1; }
echo "cuda_torch: ${library[0]} holds cubins for sm_75, sm_80, sm_90 and compute_90 PTX"

"$python" -m pytest -q -p no:cacheprovider tests/test_backends_vs_reference.py tests/test_api.py tests/test_errors.py \
  tests/test_state_dict.py tests/test_buffers.py tests/test_build.py
echo "cuda_torch: OK in $((SECONDS - started)) s"
