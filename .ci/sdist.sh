#!/usr/bin/env bash
# The sdist as a user installs a release, with pip's defaults: build isolation hides torch from the build, so
# the wheel is pure Python and fastavg must compile its kernels on first use. Builds the sdist, installs it into a
# fresh venv next to torch, and runs the sdist's own tests from its unpacked copy, so that they import the
# installed package: the just-in-time build test (which compiles into the cache used after it), then
# `python -m fastavg` must report the CPU backend available, then a slice of the CPU backend against the reference.
# Deletes the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
started=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" setup.py -q sdist --dist-dir "$work" 2>/dev/null
sdist=("$work"/fastavg-*.tar.gz)
"$PYTHON" -m venv "$work/venv"
python="$work/venv/bin/python"
# setuptools: tests/test_build.py runs the sdist's setup.py.
# --retries 0: where PyTorch's index is out of reach (a machine with a local wheel of torch), pip would retry it
# five times for every package; where it is reachable, one try suffices.
"$python" -m pip install -q --retries 0 "torch==2.13.0+cpu" pytest setuptools \
  --extra-index-url https://download.pytorch.org/whl/cpu
"$python" -m pip install -q "${sdist[0]}"
tar xzf "${sdist[0]}" -C "$work"
cd "$work"/fastavg-*/
export FASTAVG_CACHE_DIR="$work/cache"
# pytest run by path (not python -m) keeps the unpacked source off sys.path: the installed fastavg is tested.
FASTAVG_SLOW_TESTS=1 FASTAVG_JIT_TEST_CACHE="$FASTAVG_CACHE_DIR" "$work/venv/bin/pytest" -q -p no:cacheprovider \
  tests/test_build.py
report="$(cd / && "$python" -m fastavg)"
echo "$report"
grep -q "^  cpu  *available" <<<"$report"
grep -q "^compiled extension: compiled just in time ($FASTAVG_CACHE_DIR" <<<"$report"
(cd / && "$python" -c 'import fastavg, os; assert "site-packages" in fastavg.__file__, fastavg.__file__')
# A slice of the matrix (AdamW, fp32, every averager and layout) shows the compiled kernels right; the whole matrix
# runs in the main test run.
"$work/venv/bin/pytest" -q -p no:cacheprovider tests/test_backends_vs_reference.py -k "cpu and float32 and adamw and in_place"
echo "sdist: OK in $((SECONDS - started)) s (pure-Python wheel from pip's defaults, kernels compiled on first use)"
