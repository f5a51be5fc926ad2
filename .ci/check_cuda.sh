#!/usr/bin/env bash
# Compile-checks the CUDA backend without a GPU: every csrc/*.cu with nvcc for sm_80 and sm_90 (+PTX),
# and the CUDA op registration (csrc/fastavg_cuda_ops.cpp) with g++ -fsyntax-only against torch's headers.
# Exits non-zero on any failure. Without nvcc it fails with a message, unless FASTAVG_SKIP_CUDA_CHECK=1.
# PYTHON names the interpreter whose torch provides the headers (default: python).
set -uo pipefail

cd "$(dirname "$0")/.."

NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  if [[ "${FASTAVG_SKIP_CUDA_CHECK:-0}" == "1" ]]; then
    echo "check_cuda: nvcc not found; skipping the CUDA compile check (FASTAVG_SKIP_CUDA_CHECK=1)"
    exit 0
  fi
  echo "check_cuda: nvcc not found (not on PATH, not at /usr/local/cuda/bin/nvcc); install the CUDA toolkit," >&2
  echo "check_cuda: or set FASTAVG_SKIP_CUDA_CHECK=1 to skip this check" >&2
  exit 1
fi
echo "check_cuda: $("$NVCC" --version | tail -n 1) ($NVCC)"

# The toolkit's include dirs, as nvcc passes them to the host compiler (nvcc may be a wrapper script
# outside the toolkit, so its own location does not tell where the headers are).
cuda_include_flags=()
while IFS= read -r dir; do
  cuda_include_flags+=(-isystem "$dir")
done < <("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 |
  sed -n 's/^#\$ \(SYSTEM_\)\{0,1\}INCLUDES=//p' | grep -o '"[^"]*"' | tr -d '"' | sed -n 's/^-I//; /^\//p')
if [[ ${#cuda_include_flags[@]} -eq 0 ]]; then
  cuda_include_flags=(-isystem "$(dirname "$NVCC")/../include")
fi

failures=0
run() {
  echo "check_cuda: $*"
  if ! "$@"; then
    echo "check_cuda: FAILED: $*" >&2
    failures=$((failures + 1))
  fi
}

shopt -s nullglob
cuda_sources=(csrc/*.cu)
if [[ ${#cuda_sources[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu file in csrc/" >&2
  exit 1
fi
# torch's BuildExtension compiles .cu files with the implicit half/bfloat16 conversions and operators
# switched off; so does this check, so that code relying on them fails here rather than in setup.py.
torch_nvcc_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
for source in "${cuda_sources[@]}"; do
  run "$NVCC" -std=c++17 -O3 "${torch_nvcc_flags[@]}" -Icsrc \
    -gencode arch=compute_80,code=sm_80 \
    -gencode 'arch=compute_90,code=[sm_90,compute_90]' \
    -c "$source" -o /dev/null
done

if ! TORCH_INCLUDES="$("${PYTHON:-python}" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem" + p for p in include_paths()))')"; then
  echo "check_cuda: FAILED: torch is not importable, so the registration cannot be checked" >&2
  exit 1
fi
# A CPU-only torch ships c10/cuda without the header its CMake generates (cuda_cmake_macros.h, which only
# sets a Windows export macro); C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it. Torch's headers are system
# headers here so that their own warnings do not drown ours.
# shellcheck disable=SC2086
run g++ -fsyntax-only -std=c++17 -Wall -DFASTAVG_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
  $TORCH_INCLUDES "${cuda_include_flags[@]}" -Icsrc csrc/fastavg_cuda_ops.cpp

if [[ $failures -ne 0 ]]; then
  echo "check_cuda: $failures check(s) failed" >&2
  exit 1
fi
echo "check_cuda: OK (${#cuda_sources[@]} .cu file(s) for sm_80 and sm_90+PTX; csrc/fastavg_cuda_ops.cpp syntax)"
