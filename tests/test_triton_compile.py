"""The Triton kernel compiled for a GPU (sm_90) without one: the PTX has the paths the kernel is designed around.

The interpreter that runs the Triton tests on CPU ignores ``tl.multiple_of`` hints and vector widths, so only the
compiled code shows whether a row's full blocks get 16-byte vector accesses on the aligned path (the reason for
the unmasked blocks and the pointer hints) and whether the unaligned path and the masked tail stay scalar (a
hinted misaligned vector access faults on a GPU). Triton's own compiler (``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, ptxas included) builds the real ``_step_kernel`` for a few specializations, with
the arguments the ops themselves pass: each op runs on meta tensors with the launch captured.

conftest.py sets TRITON_INTERPRET=1 before anything imports Triton, which makes ``@triton.jit`` functions
interpreted ones; the compilation therefore runs in a subprocess without it (this file, run as a script).
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

ARCH = 90

# name: (op, dtype, the streams the full blocks load, the streams they store). A stream is a row pointer;
# "param"/"grad"/"lawa_ring_slot" hold the parameter dtype, the rest fp32.
SPECIALIZATIONS = {
    "adamw_ema_fp32": ("adamw_ema", "float32", ["param", "grad", "exp_avg", "exp_avg_sq", "average"],
                       ["param", "exp_avg", "exp_avg_sq", "average"]),
    "adamw_ema_bf16": ("adamw_ema", "bfloat16", ["param", "grad", "exp_avg", "exp_avg_sq", "average"],
                       ["param", "exp_avg", "exp_avg_sq", "average"]),
    "sgd_momentum_ema_fp32": ("sgd_momentum_ema", "float32", ["param", "grad", "momentum_buffer", "average"],
                              ["param", "momentum_buffer", "average"]),
    "average_ema_fp32": ("average_ema", "float32", ["param", "average"], ["param", "average"]),
    "average_lawa_bf16": ("average_lawa", "bfloat16", ["param", "lawa_sum", "lawa_ring_slot"],
                          ["param", "lawa_sum", "lawa_ring_slot"]),
}
PARAM_DTYPE_STREAMS = {"param", "grad", "lawa_ring_slot"}


def _compile_all(names):
    """In the subprocess: ``{name: {"ptx", "ttir", "num_warps", "block"}}``, or ``{"skip": why}``."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from fastavg import _triton
    from fastavg.averaging import RULE_EMA, RULE_LAWA

    if not isinstance(_triton._step_kernel, triton.runtime.jit.JITFunction):
        return {"error": "TRITON_INTERPRET is set: the kernel is an interpreted function"}
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(ARCH).path
    except Exception as error:  # no NVIDIA backend or no ptxas: nothing to compile with
        return {"skip": f"Triton cannot compile for sm_{ARCH} here ({type(error).__name__}: {error})"}

    meta = torch.device("meta")

    def op_call(op, dtype):
        """Runs ``op`` on meta tensors; returns the keyword arguments of the kernel launch it makes."""
        dtype = getattr(torch, dtype)
        params = [torch.empty(1000, dtype=dtype, device=meta)]
        grads = [torch.empty(1000, dtype=dtype, device=meta)]
        segments = torch.empty(1, 4, dtype=torch.int64, device=meta)
        flat = [torch.empty(1024, device=meta) for _ in range(3)]
        ring_slot = torch.empty(1024, dtype=dtype, device=meta)
        lr, step, weights = (torch.empty(1, device=meta) for _ in range(3))
        captured = {}

        class Capture:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                return lambda **kwargs: captured.update(kernel=self.kernel, kwargs=kwargs)

        wrap_triton, _triton.wrap_triton = _triton.wrap_triton, Capture
        try:
            if op == "adamw_ema":
                _triton._adam_step_(params, grads, segments, flat[:2], flat[2:], lr, step, weights, 0.9, 0.999, 1e-8,
                                    0.01, True, False, False, RULE_EMA, 0.0, 0.0, False)
            elif op == "sgd_momentum_ema":
                _triton._sgd_step_(params, grads, segments, flat[:1], flat[2:], lr, step, weights, 0.9, 0.0, 0.0,
                                   False, False, False, RULE_EMA, 0.0, 0.0, False)
            elif op == "average_ema":
                _triton._average_(params, segments, flat[2:], weights, RULE_EMA, 0.0, 0.0, False)
            elif op == "average_lawa":
                _triton._average_(params, segments, [flat[2], ring_slot], weights, RULE_LAWA, 0.0, 0.0, False)
        finally:
            _triton.wrap_triton = wrap_triton
        return captured["kernel"], captured["kwargs"]

    type_names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}

    def source(kernel, kwargs):
        """The ASTSource the JIT would build for these arguments: tensors allocator-aligned (16 bytes)."""
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            name, value = param.name, kwargs[param.name]
            if param.is_constexpr or value is None:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + type_names[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{name}: unexpected kernel argument {value!r}")
        return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)

    result = {}
    for name in names:
        op, dtype = SPECIALIZATIONS[name][:2]
        kernel, kwargs = op_call(op, dtype)
        compiled = triton.compile(source(kernel, kwargs), target=GPUTarget("cuda", ARCH, 32))
        result[name] = {"ptx": compiled.asm["ptx"], "ttir": compiled.asm["ttir"],
                        "num_warps": compiled.metadata.num_warps, "block": kwargs["BLOCK"]}
    return result


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compile for real, every run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *SPECIALIZATIONS], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"compiling the kernel failed:\n{run.stderr[-6000:]}"
    result = json.loads(run.stdout)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, result.get("error")
    return result


def _count(pattern, text):
    return len(re.findall(pattern, text, flags=re.MULTILINE))


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_aligned_full_blocks_use_16_byte_vector_accesses(compiled, name):
    """Every stream of the aligned path's full blocks moves 16 bytes per access, and only that path does.

    A block of BLOCK elements gives each of the 32·num_warps threads BLOCK / (32·num_warps) consecutive elements:
    as 16-byte ``v4.b32`` accesses, 2 per fp32 stream and 1 per bf16 stream for BLOCK 1024 and 4 warps. The
    count is exact: more would mean a vectorized access outside the aligned path (a wrong hint), fewer a stream
    that stayed scalar.
    """
    _, dtype, loads, stores = SPECIALIZATIONS[name]
    ptx, block, warps = compiled[name]["ptx"], compiled[name]["block"], compiled[name]["num_warps"]
    per_thread = block // (32 * warps)

    def vectors(stream):
        size = 2 if dtype == "bfloat16" and stream in PARAM_DTYPE_STREAMS else 4
        assert per_thread * size % 16 == 0, "a thread's elements of a block must fill 16-byte accesses"
        return per_thread * size // 16

    assert _count(r"^\s*ld\.global\.v4\.b32 ", ptx) == sum(vectors(s) for s in loads)
    assert _count(r"^\s*st\.global\.v4\.b32 ", ptx) == sum(vectors(s) for s in stores)
    assert _count(r"@%p\d+ (ld|st)\.global\.v\d", ptx) == 0, "a masked access is vectorized"


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_unaligned_full_blocks_and_tails_stay_scalar(compiled, name):
    """The program still holds the plain path (unaligned rows' full blocks: unmasked scalar accesses, one per
    element and stream) and the masked tail (predicated scalar accesses)."""
    _, dtype, loads, stores = SPECIALIZATIONS[name]
    ptx, block, warps = compiled[name]["ptx"], compiled[name]["block"], compiled[name]["num_warps"]
    per_thread = block // (32 * warps)
    assert _count(r"^\s*ld\.global\.b(16|32) ", ptx) >= per_thread * len(loads)
    assert _count(r"^\s*st\.global\.b(16|32) ", ptx) >= per_thread * len(stores)
    assert _count(r"@%p\d+ ld\.global\.b(16|32) ", ptx) >= per_thread * len(loads)
    assert _count(r"@%p\d+ st\.global\.b(16|32) ", ptx) >= per_thread * len(stores)


@pytest.mark.parametrize("name", SPECIALIZATIONS)
def test_hints_sit_on_the_aligned_paths_pointers_only(compiled, name):
    """One ``tt.divisibility`` hint per row pointer (the table's addresses after their cast, ``base + offset``
    for the flat buffers), made inside the aligned branch; the plain path makes its pointers again, unhinted."""
    _, _, loads, stores = SPECIALIZATIONS[name]
    ttir = compiled[name]["ttir"]
    hinted = re.findall(r"= tt\.(int_to_ptr|addptr) .*\{tt\.divisibility = dense<16>", ttir)
    assert len(hinted) == len(set(loads) | set(stores))
    assert sorted(hinted).count("int_to_ptr") == len({"param", "grad"} & set(loads))
    assert _count(r"= tt\.int_to_ptr %\w+ : i64", ttir) == len({"param", "grad"} & set(loads))


if __name__ == "__main__":
    print(json.dumps(_compile_all(sys.argv[1:])))
