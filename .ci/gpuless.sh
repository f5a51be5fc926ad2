#!/usr/bin/env bash
# The GPU kernels proven without a GPU (called by .ci/run): the CUDA source compiled for sm_80 and sm_90
# with its resource, SASS and on-CPU execution checks (.ci/check_cuda.sh), and every Triton specialization
# the ops can launch compiled ahead of time for sm_80 and sm_90 with its vector-width, byte and spill
# checks (.ci/triton_aot.py). Exits non-zero if either fails.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
status=0
bash .ci/check_cuda.sh || status=1
"${PYTHON:-python}" .ci/triton_aot.py || status=1
echo "gpuless: $([[ $status -eq 0 ]] && echo OK || echo FAILED) in $((SECONDS - started)) s"
exit $status
