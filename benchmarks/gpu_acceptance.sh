#!/usr/bin/env bash
# One command for the day a GPU is lent (run it first, in one call of under 10 minutes):
#   1. builds the CUDA extension in place (sm_90 by default; TORCH_CUDA_ARCH_LIST overrides),
#   2. runs every GPU test (CUDA and Triton kernels against the reference, CUDA-graph replay,
#      torch.compile, the compiled-Triton checks, the fused optimizers end to end),
#   3. runs the CUDA op tests under compute-sanitizer's memcheck when it is installed,
#   4. runs the benchmark at 124M and 1B parameters (GPT-2-like layout and one tensor),
# and writes summary.md (device, versions, each step's outcome, the benchmark table) to $OUT
# (default benchmarks/gpu_results), with every log beside it. Copy the table into RESULTS.md.
#
# Without a visible GPU it is a dry run: each step runs as far as this machine allows (the build
# without CUDA kernels, the tests that skip, a tiny CPU benchmark) so the script itself is checked.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/gpu_results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
summary="$OUT/summary.md"
started=$SECONDS
failures=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs it to $OUT/NAME.log, records the outcome.
step() {
  local name="$1" limit="$2"
  shift 2
  local begin=$SECONDS
  echo "gpu_acceptance: $name: $*" >&2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  if [[ $rc -eq 124 ]]; then
    verdict="TIMED OUT after ${limit} s"
  elif [[ $rc -ne 0 ]]; then
    verdict="FAILED (exit $rc)"
  fi
  [[ $verdict == ok ]] || failures=$((failures + 1))
  echo "| $name | $verdict | $((SECONDS - begin)) s | $(tail -n 1 "$OUT/$name.log" | tr '|' '/' | cut -c1-150) |" >>"$summary"
  echo "gpu_acceptance: $name: $verdict in $((SECONDS - begin)) s" >&2
}

gpu=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
{
  echo "# fastavg GPU acceptance"
  echo
  "$PYTHON" - <<'PY'
import platform, subprocess, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
try:
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except OSError:
    nvcc = "not found"
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
except OSError:
    driver = "no nvidia-smi"
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)"
print(f"- device: {device}")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton_version}, Python {platform.python_version()}")
print(f"- nvcc: {nvcc}; driver: {driver}")
PY
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | outcome | time | last line of its log |"
  echo "|---|---|---|---|"
} >"$summary"

if [[ $gpu == 1 ]]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  step build 300 env FASTAVG_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" setup.py build_ext --inplace
  step gpu_tests 240 "$PYTHON" -m pytest -q -x tests/test_cuda.py tests/test_triton.py tests/test_triton_compile.py \
    tests/test_buffers.py tests/test_api.py
  # What only a GPU checks: CUDA-graph capture and replay of a training step, GradScaler's deferred found_inf read,
  # AveragedModel's pinned CPU offload.
  step gpu_only_tests 120 "$PYTHON" -m pytest -q tests/test_capturable.py tests/test_grad_scaler.py \
    tests/test_averaged_model.py -k "cuda or offload"
  if command -v compute-sanitizer >/dev/null; then
    step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -m pytest -q -x tests/test_cuda.py \
      -k "misaligned or more_rows or empty or graph"
  else
    echo "| memcheck | skipped: compute-sanitizer not on PATH | | |" >>"$summary"
  fi
  step benchmark 240 "$PYTHON" -m fastavg.bench --sizes 124M,1B --layouts gpt2,large --optimizers adamw,sgd \
    --averagers ema --no-reference --csv "$OUT/benchmark.csv"
else
  if compgen -G "fastavg/_C*.so" >/dev/null; then
    echo "| build | skipped: the CPU extension is already built (dry run) | | |" >>"$summary"
  else
    step build 900 env FASTAVG_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PYTHON" setup.py build_ext --inplace
  fi
  step gpu_tests 240 "$PYTHON" -m pytest -q tests/test_cuda.py tests/test_triton_compile.py
  echo "| memcheck | skipped: no CUDA device | | |" >>"$summary"
  step benchmark 240 "$PYTHON" -m fastavg.bench --sizes 200k --layouts gpt2 --optimizers adamw --averagers ema \
    --no-reference --quick --csv "$OUT/benchmark.csv"
fi

{
  echo
  echo "Total: $((SECONDS - started)) s, $failures step(s) not ok."
  echo
  sed -n '/^| config/,$p' "$OUT/benchmark.log"
} >>"$summary"
cat "$summary"
[[ $failures -eq 0 ]]
