#!/usr/bin/env bash
# Checks the CUDA backend without a GPU. Exits non-zero on any failure.
#
# 1. Compiles every csrc/*.cu with nvcc for sm_80 and sm_90 (+PTX), with torch's half/bfloat16 flags and
#    the build's --fmad=false (fastavg/_build.py) (floating-point contraction off).
# 2. From ptxas (-Xptxas -v): every step kernel of fastavg_cuda.cu is there for both architectures and none
#    spills registers (no local-memory spill stores or loads).
# 3. From the SASS (cuobjdump -sass) and the PTX (kept by nvcc --keep): the vector path compiles to 128-bit
#    global loads and stores (LDG.E.128 / STG.E.128): in every step kernel, and in the AdamW + EMA kernels
#    (fp32, bf16, fp16) for every buffer of a pack; no kernel uses generic (LD/ST) or local (LDL/STL) memory
#    accesses; no contraction: no fp32 fma and only explicitly rounded add/sub/mul in the PTX, no FFMA in the
#    SASS outside the division and square root sequences.
# 4. Runs the CUDA kernels on the CPU (.ci/cuda_emulation/run.sh): fastavg_cuda.cu compiled as host C++
#    against an emulation of the CUDA language and runtime, the op matrix bit for bit against a scalar loop
#    over the same rules, under several thread orders and grids, plain and with ASan + UBSan, and a mutation
#    self-test that shows the harness catches injected bugs.
# 5. Syntax-checks the CUDA op registration (csrc/fastavg_cuda_ops.cpp) with g++ against torch's headers.
#
# Without nvcc it fails with a message, unless FASTAVG_SKIP_CUDA_CHECK=1. cuobjdump is taken from
# $CUOBJDUMP, the toolkit, PATH, or Triton's package (which ships one). PYTHON names the interpreter whose
# torch provides the headers (default: python).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
started=$SECONDS

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

# What nvcc would run, without running it: the toolkit's include dirs as it passes them to the host
# compiler, and its root (nvcc may be a wrapper script outside the toolkit, so its own location does not
# tell).
nvcc_dryrun="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1)"
cuda_include_flags=()
while IFS= read -r dir; do
  cuda_include_flags+=(-isystem "$dir")
done < <(sed -n 's/^#\$ \(SYSTEM_\)\{0,1\}INCLUDES=//p' <<<"$nvcc_dryrun" | grep -o '"[^"]*"' | tr -d '"' |
  sed -n 's/^-I//; /^\//p')
if [[ ${#cuda_include_flags[@]} -eq 0 ]]; then
  cuda_include_flags=(-isystem "$(dirname "$NVCC")/../include")
fi
cuda_top="$(sed -n 's/^#\$ TOP=//p' <<<"$nvcc_dryrun" | head -n 1)"

failures=0
run() {
  echo "check_cuda: $*"
  if ! "$@"; then
    echo "check_cuda: FAILED: $*" >&2
    failures=$((failures + 1))
  fi
}
fail() {
  echo "check_cuda: FAILED: $*" >&2
  failures=$((failures + 1))
}
elapsed() { echo "check_cuda: ... $((SECONDS - started)) s"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

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
# The build's own nvcc flags (NVCC_FLAGS in fastavg/_build.py): contraction off.
setup_nvcc_flags=(--fmad=false)

# 1. Compile, keeping the objects and ptxas's report of each kernel.
for source in "${cuda_sources[@]}"; do
  name="$(basename "$source" .cu)"
  echo "check_cuda: $NVCC -std=c++17 -O3 --fmad=false ... -gencode sm_80 -gencode sm_90+PTX -Xptxas -v -c $source"
  mkdir -p "$work/keep/$name"
  if "$NVCC" -std=c++17 -O3 "${setup_nvcc_flags[@]}" "${torch_nvcc_flags[@]}" -Icsrc \
    -gencode arch=compute_80,code=sm_80 \
    -gencode 'arch=compute_90,code=[sm_90,compute_90]' \
    --keep --keep-dir "$work/keep/$name" \
    -Xptxas -v -c "$source" -o "$work/$name.o" 2>"$work/$name.log"; then
    # Anything but ptxas's per-kernel report (warnings) is shown.
    grep -v -e '^ptxas info' -e 'bytes stack frame' "$work/$name.log" || true
  else
    cat "$work/$name.log" >&2
    fail "nvcc $source"
  fi
done
elapsed

# 2 and 3 read the kernels of fastavg_cuda.cu.
kernel_object="$work/fastavg_cuda.o"
if [[ -f "$kernel_object" ]]; then
  CUOBJDUMP="${CUOBJDUMP:-}"
  for candidate in "$cuda_top/bin/cuobjdump" "$(command -v cuobjdump || true)" \
    "$("$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null)"; do
    if [[ -z "$CUOBJDUMP" && -n "$candidate" && -x "$candidate" ]]; then
      CUOBJDUMP="$candidate"
    fi
  done
  sass_files=()
  if [[ -z "$CUOBJDUMP" ]]; then
    fail "no cuobjdump (not in the toolkit, not on PATH, no Triton package); set CUOBJDUMP to one"
  else
    echo "check_cuda: $CUOBJDUMP -sass -arch sm_80|sm_90 fastavg_cuda.o"
    for arch in sm_80 sm_90; do
      if "$CUOBJDUMP" -sass -arch "$arch" "$kernel_object" >"$work/$arch.sass"; then
        sass_files+=("$arch=$work/$arch.sass")
      else
        fail "cuobjdump -sass -arch $arch"
      fi
    done
  fi
  ptx_files=()
  for ptx in "$work/keep/fastavg_cuda"/*.ptx; do ptx_files+=("ptx=$ptx"); done
  if [[ ${#ptx_files[@]} -eq 0 ]]; then
    fail "nvcc --keep left no PTX of fastavg_cuda.cu to inspect"
  fi
  if ! "$PYTHON" .ci/cuda_sass_check.py "$work/fastavg_cuda.log" "${sass_files[@]}" "${ptx_files[@]}"; then
    fail "ptxas report / PTX / SASS expectations (see above)"
  fi
else
  fail "no csrc/fastavg_cuda.cu object to inspect"
fi
elapsed

# 4. The kernels on the CPU, with the toolkit's headers as nvcc finds them.
cuda_include=""
for ((i = 1; i < ${#cuda_include_flags[@]}; i += 2)); do
  if [[ -z "$cuda_include" && -f "${cuda_include_flags[i]}/cuda_bf16.h" ]]; then
    cuda_include="${cuda_include_flags[i]}"
  fi
done
CUDA_INCLUDE="$cuda_include" PYTHON="$PYTHON" run bash .ci/cuda_emulation/run.sh
elapsed

# 5. The registration.
if ! TORCH_INCLUDES="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem" + p for p in include_paths()))')"; then
  echo "check_cuda: FAILED: torch is not importable, so the registration cannot be checked" >&2
  exit 1
fi
# A CPU-only torch ships c10/cuda without the header its CMake generates (cuda_cmake_macros.h, which only
# sets a Windows export macro); C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it. Torch's headers are system
# headers here so that their own warnings do not drown ours.
# shellcheck disable=SC2086
run g++ -fsyntax-only -std=c++17 -Wall -DFASTAVG_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
  $TORCH_INCLUDES "${cuda_include_flags[@]}" -Icsrc csrc/fastavg_cuda_ops.cpp
elapsed

if [[ $failures -ne 0 ]]; then
  echo "check_cuda: $failures check(s) failed" >&2
  exit 1
fi
echo "check_cuda: OK in $((SECONDS - started)) s (${#cuda_sources[@]} .cu file(s) for sm_80 and sm_90+PTX; no spills;" \
  "128-bit global accesses; no contraction; kernels run on the CPU, sanitized and mutation-tested;" \
  "csrc/fastavg_cuda_ops.cpp syntax)"
