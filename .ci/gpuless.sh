#!/usr/bin/env bash
# The GPU kernels proven without a GPU (called by .ci/run): the CUDA source compiled for sm_80 and sm_90
# with its resource, SASS and on-CPU execution checks (.ci/check_cuda.sh), and the Triton specializations
# the ops can launch compiled ahead of time with their vector-width, byte and spill checks
# (.ci/triton_aot.py): every one for sm_90 (H100/H200), every fifth for sm_80, which keeps CI under its
# 40 minutes; `python .ci/triton_aot.py` compiles all of them for both (about 8 minutes on 2 idle cores).
# Exits non-zero if either fails.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
status=0
bash .ci/check_cuda.sh || status=1
"${PYTHON:-python}" .ci/triton_aot.py --arch 90 || status=1
"${PYTHON:-python}" .ci/triton_aot.py --arch 80 --sample 5 || status=1
echo "gpuless: $([[ $status -eq 0 ]] && echo OK || echo FAILED) in $((SECONDS - started)) s"
exit $status
