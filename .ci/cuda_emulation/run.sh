#!/usr/bin/env bash
# The CUDA kernels of csrc/fastavg_cuda.cu run on the CPU (see cuda_emulation.h for how), three ways:
#
# 1. plain: the file compiled as host C++ (-O2) with the emulation shim; harness.cpp runs the op matrix
#    (every optimizer x averaging x dtype, at state offsets 0, 3 and 4 elements: every alignment class of the
#    fp32 state and 16-bit LAWA ring) under 3 thread/block orders (forward, reverse, shuffled) on 2 grids, bit
#    for bit against a scalar loop over the rules of fastavg_rules.h; then test_ops.py runs tests/test_cuda.py's
#    op-level tests on the same kernels, registered as torch ops on CPU tensors, against
#    fastavg._backends.REFERENCE (needs torch and a built fastavg._C).
# 2. sanitized: the same with -fsanitize=address,undefined (-O1), under the 3 orders and 2 grids at state
#    offset 0 (rows on both paths) and under a shuffled order at offset 3 (every row on the scalar path): any
#    out-of-bounds access, misaligned access or other undefined behaviour fails the run, and so does a
#    result that differs between thread orders or grids.
# 3. mutations: mutations.py injects known bugs into copies of the file (out-of-bounds index, misaligned
#    vector path, off-by-one tails, missing __syncthreads, vector path never taken, the parameter stored by
#    averaging alone or never stored, wrong grid stride) and
#    requires the sanitized harness to catch each one.
#
# Floating-point contraction is off (-ffp-contract=off) for the kernels and the scalar loop alike, as for
# the GPU build (nvcc --fmad=false): every multiply and add rounds on its own, so the comparison is exact.
#
# About 4 minutes on 2 idle cores (some 8 minutes of CPU time, 3 of them builds). Needs g++ with
# AddressSanitizer and UBSan, Python 3 (and torch with a built fastavg._C for test_ops.py), and the CUDA
# toolkit's headers (cuda_runtime_api.h, cuda_bf16.h, cuda_fp16.h): from $CUDA_INCLUDE, else next to nvcc
# (as nvcc reports them), else /usr/local/cuda/include. Exits non-zero on any failure.
set -uo pipefail

cd "$(dirname "$0")/../.."
here=.ci/cuda_emulation
started=$SECONDS
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python3}"

cuda_include="${CUDA_INCLUDE:-}"
if [[ -z "$cuda_include" ]]; then
  nvcc="$(command -v nvcc || true)"
  [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
  if [[ -n "$nvcc" ]]; then
    while IFS= read -r dir; do
      if [[ -z "$cuda_include" && -f "$dir/cuda_bf16.h" ]]; then cuda_include="$dir"; fi
    done < <("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ \(SYSTEM_\)\{0,1\}INCLUDES=//p' |
      grep -o '"[^"]*"' | tr -d '"' | sed -n 's/^-I//; /^\//p')
    [[ -z "$cuda_include" ]] && cuda_include="$(dirname "$nvcc")/../include"
  else
    cuda_include=/usr/local/cuda/include
  fi
fi
for header in cuda_runtime_api.h cuda_bf16.h cuda_fp16.h; do
  if [[ ! -f "$cuda_include/$header" ]]; then
    echo "cuda_emulation: $header not found in $cuda_include (set CUDA_INCLUDE to the toolkit's include dir)" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/plain" "$work/sanitized"

common=(-std=c++17 -ffp-contract=off -Wall -Wextra -Wno-unknown-pragmas -isystem "$cuda_include" -Icsrc "-I$here")
plain=("$CXX" "${common[@]}" -O2 -fPIC)  # position-independent: test_ops.py links them into a torch library
sanitizers=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
sanitized=("$CXX" "${common[@]}" -O1 -g "${sanitizers[@]}")
# The mutants: -O0 builds in a third of -O1's time; they only have to run until the first failure.
mutant=("$CXX" "${common[@]}" -O0 -g "${sanitizers[@]}" -x c++ -include "$here/cuda_emulation.h")
kernel_flags=(-x c++ -include "$here/cuda_emulation.h")
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

say() { echo "cuda_emulation: $*"; }

# A lane runs its steps in order and stops at its first failure; the lanes run side by side.
build() {  # build DIR COMPILER... : the runtime, the harness and the kernels, linked into DIR/harness
  local dir="$1"
  shift
  "$@" -c "$here/cuda_emulation.cpp" -o "$dir/rt.o" &&
    "$@" -c "$here/harness.cpp" -o "$dir/harness.o" &&
    "$@" "${kernel_flags[@]}" -c csrc/fastavg_cuda.cu -o "$dir/kernels.o" &&
    "$@" "$dir/rt.o" "$dir/harness.o" "$dir/kernels.o" -pthread -o "$dir/harness"
}
timed() {  # timed LABEL COMMAND...
  local label="$1" t0=$SECONDS
  shift
  if "$@"; then
    say "$label: ok ($((SECONDS - t0)) s)"
  else
    say "FAILED: $label ($((SECONDS - t0)) s)"
    return 1
  fi
}

op_tests() {  # test_ops.py, quietly: its summary line, or the end of its output when it fails. One torch
  # thread: the other lanes have the other core.
  if OMP_NUM_THREADS=1 CUDA_EMULATION_ORDER=shuffled CUDA_EMULATION_OBJECTS="$work/plain" CUDA_INCLUDE="$cuda_include" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "$here/test_ops.py" >"$work/test_ops.log" 2>&1; then
    echo "test_ops: $(tail -n 1 "$work/test_ops.log")"
  else
    tail -n 150 "$work/test_ops.log"
    return 1
  fi
}
lane_plain() {
  timed "plain build (-O2)" build "$work/plain" "${plain[@]}" &&
    timed "plain run: 3 orders x 2 grids x 3 state offsets" "$work/plain/harness" --skews=0,3,4 &&
    timed "tests/test_cuda.py's op tests on the emulation against the Python reference (shuffled order)" op_tests
}
lane_sanitized() {
  timed "sanitized run: 3 orders x 2 grids, state offset 0" "$work/sanitized/harness" --skews=0 &&
    timed "sanitized run: shuffled order x 2 grids, state offset 3" \
      "$work/sanitized/harness" --skews=3 --orders=shuffled
}
lane_mutations() {
  timed "mutation self-test" "$PYTHON" "$here/mutations.py" --build-dir "$work/sanitized" --jobs 2 \
    --compile "${mutant[*]}" --link "$CXX ${sanitizers[*]} -pthread $work/sanitized/rt.o $work/sanitized/harness.o"
}

say "CUDA headers from $cuda_include; $CXX $("$CXX" -dumpfullversion 2>/dev/null || true)"
(lane_plain >"$work/plain.log" 2>&1) &
plain_pid=$!
# The sanitized run and the mutants (which link against the sanitized runtime and harness) follow the
# sanitized build; then three lanes share the cores.
if timed "sanitized build (-O1, ASan + UBSan)" build "$work/sanitized" "${sanitized[@]}" >"$work/build.log" 2>&1; then
  (lane_sanitized >"$work/sanitized.log" 2>&1) &
  sanitized_pid=$!
  lane_mutations >"$work/mutations.log" 2>&1
  mutations_status=$?
  wait "$sanitized_pid"
  sanitized_status=$?
else
  sanitized_status=1 mutations_status=1
  : >"$work/sanitized.log"
  : >"$work/mutations.log"
fi
wait "$plain_pid"
plain_status=$?
cat "$work/plain.log" "$work/build.log" "$work/sanitized.log" "$work/mutations.log"

if [[ $plain_status -ne 0 || $sanitized_status -ne 0 || $mutations_status -ne 0 ]]; then
  say "FAILED in $((SECONDS - started)) s"
  exit 1
fi
say "OK in $((SECONDS - started)) s"
