"""The Triton kernel compiled for a GPU (sm_90) without one: the PTX has the paths the kernel is designed around.

The interpreter that runs the Triton tests on CPU ignores ``tl.multiple_of`` hints, vector widths and compile options,
so only the compiled code shows whether a row's full blocks get 16-byte vector accesses on the aligned path (the
reason for the unmasked blocks and the pointer hints), whether the masked path stays scalar (a hinted misaligned
vector access faults on a GPU) and whether the arithmetic is free of contraction. .ci/triton_aot.py compiles every
specialization the ops can launch, for sm_80 and sm_90, with Triton's own compiler (ptxas included) through the real
launch path, and checks each; CI runs it whole. Here it runs on five specializations for sm_90, and the tests below
read its results and the code it compiled.

conftest.py sets TRITON_INTERPRET=1 before anything imports Triton, which makes ``@triton.jit`` functions
interpreted ones; the script therefore runs in a subprocess without it.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = 90

# name: (the script's name of the kernel, the streams the aligned blocks load, the streams they store). A stream is
# a row pointer; "param"/"grad"/"lawa_ring_slot" hold the parameter dtype, the rest fp32.
SPECIALIZATIONS = {
    "adamw_ema_fp32": ("fp32/adam/emax1", ["param", "grad", "exp_avg", "exp_avg_sq", "average"],
                       ["param", "exp_avg", "exp_avg_sq", "average"]),
    "adamw_ema_bf16": ("bf16/adam/emax1", ["param", "grad", "exp_avg", "exp_avg_sq", "average"],
                       ["param", "exp_avg", "exp_avg_sq", "average"]),
    "sgd_momentum_ema_fp32": ("fp32/sgd+mom/emax1", ["param", "grad", "momentum_buffer", "average"],
                              ["param", "momentum_buffer", "average"]),
    # Averaging alone reads θ and never stores it (only BELAY and a switch change it).
    "average_ema_fp32": ("fp32/none/emax1", ["param", "average"], ["average"]),
    "average_lawa_bf16": ("bf16/none/lawa", ["param", "lawa_sum", "lawa_ring_slot"], ["lawa_sum", "lawa_ring_slot"]),
}
MASKED_COLUMNS = 128  # fastavg._triton._MASKED_COLUMNS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``{name: the script's row for that kernel, with its PTX and TTIR}``."""
    out = tmp_path_factory.mktemp("triton_aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    only = "^(" + "|".join(re.escape(kernel) for kernel, _, _ in SPECIALIZATIONS.values()) + ")$"
    run = subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "triton_aot.py"), "--arch", str(ARCH),
                          "--only", only, "--json", str(out), "--asm"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if run.returncode == 2 and "CANNOT COMPILE" in run.stdout:
        pytest.skip(run.stdout.strip())
    rows = {row["name"]: row for row in json.loads(out.read_text())} if out.exists() else {}
    assert rows, f"the AOT compile produced nothing:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return {name: rows.get(kernel) for name, (kernel, _, _) in SPECIALIZATIONS.items()}, run


def _count(pattern, text):
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def test_every_selected_kernel_compiles_and_passes_the_audit(compiled):
    rows, run = compiled
    assert all(rows.values()), f"kernels missing: {[n for n, r in rows.items() if not r]}\n{run.stdout[-4000:]}"
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    for name, row in rows.items():
        assert not row["violations"], f"{name}: {row['violations']}"


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_aligned_full_blocks_use_16_byte_vector_accesses(compiled, name):
    """Every stream of the aligned path's full blocks moves 16 bytes per access, at the minimum bytes per element.

    A block of BLOCK elements gives each of the 32·num_warps threads BLOCK / (32·num_warps) consecutive elements:
    as 16-byte ``v4.b32`` accesses, 2 per fp32 stream and 1 per bf16 stream for BLOCK 1024 and 4 warps. The
    count is exact: more would mean a vectorized access outside the aligned path (a wrong hint) or a buffer read
    twice, fewer a stream that stayed scalar.
    """
    row = compiled[0][name]
    _, loads, stores = SPECIALIZATIONS[name]
    dtype_bytes = 2 if name.endswith("bf16") else 4
    per_thread = 1024 // (32 * row["num_warps"])

    def vectors(stream):
        size = dtype_bytes if stream in ("param", "grad", "lawa_ring_slot") else 4
        return per_thread * size // 16

    ptx = row["asm"]["ptx"]
    assert row["loads"] == _count(r"^\s*ld\.global\.v4\.b32 ", ptx) == sum(vectors(s) for s in loads)
    assert row["stores"] == _count(r"^\s*st\.global\.v4\.b32 ", ptx) == sum(vectors(s) for s in stores)
    assert row["bytes"] == row["minimum"] == sum(vectors(s) * 16 for s in loads + stores) / per_thread
    assert _count(r"@%p\d+ (ld|st)\.global\.v\d", ptx) == 0, "a masked access is vectorized"


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_masked_path_stays_scalar(compiled, name):
    """The program still holds the masked path (a row's tail, and every block of a row that is not 16-byte aligned):
    predicated scalar accesses, one per element a thread holds and stream. The audit checks that none of its values
    cross shared memory (loads and stores in one layout); a bf16 kernel's aligned path does, between the 8 bf16 and
    the 4 fp32 elements a thread holds per 16-byte vector."""
    row = compiled[0][name]
    _, loads, stores = SPECIALIZATIONS[name]
    ptx = row["asm"]["ptx"]
    per_thread = 1024 // (32 * row["num_warps"])
    assert _count(r"@%p\d+ ld\.global\.b(16|32) ", ptx) >= per_thread * len(loads)
    assert _count(r"@%p\d+ st\.global\.b(16|32) ", ptx) >= per_thread * len(stores)
    assert row["shared"] == 0 or name.endswith("bf16"), "values cross shared memory"


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_hints_sit_on_the_aligned_paths_pointers_only(compiled, name):
    """One ``tt.divisibility`` hint per row pointer (the table's addresses after their cast, ``base + offset``
    for the flat buffers), made for the aligned path; the masked path makes its pointers again, unhinted."""
    _, loads, stores = SPECIALIZATIONS[name]
    ttir = compiled[0][name]["asm"]["ttir"]
    hinted = re.findall(r"= tt\.(int_to_ptr|addptr) .*\{tt\.divisibility = dense<16>", ttir)
    assert len(hinted) == len(set(loads) | set(stores))
    assert sorted(hinted).count("int_to_ptr") == len({"param", "grad"} & set(loads))
    assert _count(r"= tt\.int_to_ptr %\w+ : i64", ttir) == len({"param", "grad"} & set(loads))


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_no_contraction(compiled, name):
    """Compiled with ``enable_fp_fusion=False``: each f32 multiply and add its own ``.rn`` instruction, no FMA."""
    ptx = compiled[0][name]["asm"]["ptx"]
    assert _count(r"^\s*(fma|mad)\.\w*\.?f32", ptx) == 0
    assert _count(r"^\s*(mul|add|sub)\.rn\.f32", ptx) > 0
    assert _count(r"^\s*(mul|add|sub)\.f32", ptx) == 0, "an f32 operation without .rn, which ptxas may contract"
