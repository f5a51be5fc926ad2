#!/usr/bin/env bash
# The Triton backend with the Triton versions users run, in a scratch venv that is deleted at the end: the version
# torch's CUDA wheel pins for the torch the README names (torch 2.13.0 -> triton 3.7.1), then the newest on the
# package index. For each: the interpreter tests (tests/test_triton.py) and a sample of the ahead-of-time compile
# (.ci/triton_aot.py --sample N: every N-th kernel, for sm_80 and sm_90).
#
#   bash .ci/triton_versions.sh                       # triton 3.7.1, then the newest
#   TRITON_VERSIONS="3.7.1 3.8.0 latest" TRITON_AOT_SAMPLE=8 bash .ci/triton_versions.sh
#
# torch is pinned by a constraints file, so that no Triton install pulls another torch. Exits non-zero if any run
# fails; prints one summary line per version at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRITON_VERSIONS=${TRITON_VERSIONS:-"3.7.1 latest"}
SAMPLE=${TRITON_AOT_SAMPLE:-16}
PYTHON=${PYTHON:-python}

venv=$(mktemp -d "${TMPDIR:-/tmp}/fastavg-triton-versions.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
py="$venv/bin/python"
echo "torch==$TORCH_VERSION" > "$venv/constraints.txt"
pip_install() {  # quiet but for errors (not the complaints about a configured local index that is absent)
  "$py" -m pip install -q --disable-pip-version-check -c "$venv/constraints.txt" "$@" \
    2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install "torch==$TORCH_VERSION" pytest numpy

status=0
summary=()
for version in $TRITON_VERSIONS; do
  if [ "$version" = latest ]; then pip_install --upgrade triton; else pip_install "triton==$version"; fi
  installed=$("$py" -c "import torch, triton; print(f'triton {triton.__version__} / torch {torch.__version__}')")
  echo "=== $installed"
  tests=passed
  start=$SECONDS
  PYTHONPATH=$PWD "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py || { tests=FAILED; status=1; }
  tests_s=$((SECONDS - start))
  aot=passed
  start=$SECONDS
  PYTHONPATH=$PWD "$py" .ci/triton_aot.py --quiet --sample "$SAMPLE" || { aot=FAILED; status=1; }
  summary+=("$installed: interpreter tests $tests (${tests_s} s), AOT sample 1/$SAMPLE $aot ($((SECONDS - start)) s)")
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $status
