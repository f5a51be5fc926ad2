"""tests/test_cuda.py's op-level tests, on the CUDA kernels of csrc/fastavg_cuda.cu run by the CPU emulation,
against fastavg._backends.REFERENCE with the same tolerances (tests/helpers.py).

torch_ops.cpp registers the emulated kernels as fastavg_cuda_emulation::adam_step_, sgd_step_ and average_ on
CPU tensors, behind fastavg's own argument checks and configuration (fastavg_ops.h, from fastavg._C); this
module defines those ops with the schemas of fastavg's ops, builds the library (g++ and the CUDA toolkit's
headers, ~1 minute) into a temporary directory and loads it. The inputs are test_cuda.py's: the same optimizer
and averaging configurations and layouts (but the 2**20 + 3-element one, minutes on the emulation), flat state
at misaligned offsets, more rows than the grid (an emulated H100: 132 SMs of 8 blocks), and the scalars read
from memory at every launch (test_cuda.py's CUDA-graph replays, without the graph). Thread and block orders:
$CUDA_EMULATION_ORDER (run.sh: shuffled).

    python -m pytest -q .ci/cuda_emulation/test_ops.py   (from the repository root; $CUDA_INCLUDE: the toolkit's
                                                           include directory, else found next to nvcc)
"""
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fastavg  # noqa: E402
from fastavg import _backends, _segments  # noqa: E402
from fastavg.averaging import RULE_BELAY, RULE_EMA, RULE_LAWA, RULE_NONE  # noqa: E402
from helpers import SIZES, assert_close  # noqa: E402

if fastavg.backend_status()["cpu"]:
    pytest.skip(f"fastavg._C is not built: {fastavg.backend_status()['cpu']}", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
NAMESPACE = "fastavg_cuda_emulation"
DEVICE = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LR = 0.01
RESIDENT_BLOCKS = 132 * (2048 // 256)  # the emulation's default device


def _cuda_include():
    candidates = [os.environ.get("CUDA_INCLUDE", "")]
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    candidates += [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..", "include"), "/usr/local/cuda/include"]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "cuda_bf16.h")):
            return candidate
    pytest.skip("no CUDA toolkit headers (set CUDA_INCLUDE to the directory of cuda_bf16.h)")


def _build(directory):
    """The emulated kernels and their registration as one shared library in `directory`. The runtime and the
    kernels are taken from $CUDA_EMULATION_OBJECTS (rt.o, kernels.o, position-independent) when run.sh built
    them already."""
    from torch.utils import cpp_extension

    common = ["g++", "-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-isystem", _cuda_include(),
              "-I" + os.path.join(ROOT, "csrc"), "-I" + HERE]
    torch_flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    torch_flags += [flag for path in cpp_extension.include_paths() for flag in ("-isystem", path)]
    objects = {
        "rt.o": [os.path.join(HERE, "cuda_emulation.cpp")],
        "kernels.o": ["-x", "c++", "-include", os.path.join(HERE, "cuda_emulation.h"),
                      os.path.join(ROOT, "csrc", "fastavg_cuda.cu")],
        "torch_ops.o": torch_flags + [os.path.join(HERE, "torch_ops.cpp")],
    }

    prebuilt = os.environ.get("CUDA_EMULATION_OBJECTS")
    paths = {name: os.path.join(prebuilt if prebuilt and name != "torch_ops.o" else directory, name)
             for name in objects}

    def compile_one(name):
        return subprocess.run(common + ["-c", "-o", paths[name]] + objects[name], capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for result in pool.map(compile_one, [name for name, path in paths.items() if path.startswith(directory)]):
            assert result.returncode == 0, result.stderr[-3000:]
    extension = fastavg._C.__file__
    library = os.path.join(directory, "libfastavg_cuda_emulation.so")
    link = ["g++", "-shared", "-o", library] + list(paths.values())
    link += [f"-L{path}" for path in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-pthread"]
    link += [f"-L{os.path.dirname(extension)}", f"-l:{os.path.basename(extension)}",
             f"-Wl,-rpath,{os.path.dirname(extension)}"]
    result = subprocess.run(link, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return library


_library_definitions = None


@pytest.fixture(scope="module")
def ops():
    """torch.ops.fastavg_cuda_emulation, built and loaded once."""
    global _library_definitions
    if _library_definitions is None:
        definitions = torch.library.Library(NAMESPACE, "DEF")
        for name in ("adam_step_", "sgd_step_", "average_"):
            definitions.define(str(getattr(torch.ops.fastavg, name).default._schema).split("::", 1)[1])
        with tempfile.TemporaryDirectory() as directory:
            torch.ops.load_library(_build(directory))
        _library_definitions = definitions  # the definitions live as long as the process
    return getattr(torch.ops, NAMESPACE)


# --- test_cuda.py's inputs ---------------------------------------------------------------------------------

OP_OPTIMIZERS = {
    "sgd": ("sgd_step_", dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                              heavy_ball=False), 3.0),
    "sgd_first_step": ("sgd_step_", dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                                         maximize=False, heavy_ball=False), 1.0),
    "sgd_nesterov": ("sgd_step_", dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=True,
                                       heavy_ball=False), 5.0),
    "sgd_heavy_ball": ("sgd_step_", dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
                                         maximize=False, heavy_ball=True), 5.0),
    "sgd_heavy_ball_nesterov": ("sgd_step_", dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                                                  maximize=True, heavy_ball=True), 5.0),
    "adam": ("adam_step_", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=False,
                                amsgrad=False, maximize=False), 3.0),
    "adam_amsgrad": ("adam_step_", dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01,
                                        decoupled_weight_decay=False, amsgrad=True, maximize=True), 7.0),
    "adamw": ("adam_step_", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                                 amsgrad=False, maximize=False), 3.0),
    "adamw_amsgrad": ("adam_step_", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                         decoupled_weight_decay=True, amsgrad=True, maximize=False), 2.0),
}

OP_AVERAGINGS = {
    "none": (RULE_NONE, (), False, 0.0, 0.0),
    "ema": (RULE_EMA, (0.1, 0.01, 0.001), False, 0.0, 0.0),
    "ema_8_decays": (RULE_EMA, tuple(0.5**k for k in range(1, 9)), False, 0.0, 0.0),
    "copy_phase": (RULE_EMA, (1.0,), False, 0.0, 0.0),
    "swa": (RULE_EMA, (1.0 / 3.0,), False, 0.0, 0.0),
    "belay": (RULE_BELAY, (0.05,), False, 1.0, 0.0),
    "belay_inertia": (RULE_BELAY, (0.05,), False, 0.5, 0.3),
    "belay_switch": (RULE_BELAY, (0.05,), True, 0.5, 0.3),
    "lawa": (RULE_LAWA, (), False, 0.0, 0.0),
    "sema_switch": (RULE_EMA, (0.1,), True, 0.0, 0.0),
    "switch_alone": (RULE_NONE, (), True, 0.0, 0.0),
}

ROW = _segments.ROW_NUMEL
LAYOUTS = {f"one_{n}": [("dense", (n,))] for n in SIZES if n < ROW}
LAYOUTS["mixed"] = [
    ("dense", (1,)), ("dense", (7,)), ("dense", (33, 31)),
    ("dense", (ROW,)), ("dense", (ROW + 1,)), ("dense", (3, 70001)),  # one row, two rows, four rows
    ("view", 4097, 3, 1),  # misaligned param and grad: the scalar path
    ("view", 1000, 8, 8),  # 32 (fp32) or 16 (bf16/fp16) bytes into its storage: still the vector path
    ("channels_last", (4, 6, 9, 7)),
    ("dense", (5,)),
]


def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple


def _tensor(spec, which, dtype, randn):
    kind = spec[0]
    if kind == "dense":
        tensor = randn(spec[1], dtype=dtype)
        return tensor, tensor
    if kind == "view":
        _, numel, param_offset, grad_offset = spec
        offset = param_offset if which == "param" else grad_offset
        base = randn((offset + numel + 5,), dtype=dtype)
        return base[offset:offset + numel], base
    if kind == "channels_last":
        tensor = randn(spec[1], dtype=dtype).contiguous(memory_format=torch.channels_last)
        assert not tensor.is_contiguous() and _segments.is_dense(tensor)
        return tensor, tensor
    raise ValueError(spec)


def _case(optimizer, averaging, dtype, layout, skew=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)

    specs = LAYOUTS[layout] if isinstance(layout, str) else layout
    params, grads, bases = [], [], []
    for spec in specs:
        param, param_base = _tensor(spec, "param", dtype, randn)
        grad, grad_base = _tensor(spec, "grad", dtype, randn)
        params.append(param)
        grads.append(grad)
        bases += [param_base, grad_base]
    offsets, end = [], 0
    for p in params:
        offsets.append(_round_up(end, 32) + skew)
        end = offsets[-1] + p.numel()
    flat_numel = _round_up(end, 32) + 32

    def flat(scale=1.0):
        return randn((flat_numel,), scale)

    def near_param(times=1.0, dtype=torch.float32):
        result = flat()
        for p, offset in zip(params, offsets):
            result[offset:offset + p.numel()] = times * _segments.memory_view(p).float() + randn((p.numel(),), 0.1)
        return result.to(dtype)

    optimizer_state, average_state = [], []
    if optimizer is not None:
        op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
        if op_name == "adam_step_":
            exp_avg_sq = flat().abs() * 0.01 + 1e-4
            optimizer_state = [flat(0.1), exp_avg_sq]
            if hyper["amsgrad"]:
                optimizer_state.append(exp_avg_sq * (flat(0.2) + 1.0).abs())
        elif hyper["momentum"] != 0:
            optimizer_state = [flat(0.1)]
    rule, weights, switch, _, inertia = OP_AVERAGINGS[averaging]
    if rule == RULE_LAWA:
        average_state = [near_param(3.0), near_param(dtype=dtype)]
    elif rule == RULE_BELAY:
        average_state = [near_param()] + ([flat(0.01)] if inertia > 0 else [])
    elif rule == RULE_EMA:
        average_state = [near_param() for _ in weights]
    elif switch:
        average_state = [near_param()]
    segments = _segments.build(params, grads if optimizer is not None else None, offsets, DEVICE)
    return dict(params=params, grads=grads, segments=segments, optimizer_state=optimizer_state,
                average_state=average_state, bases=bases)


def _call(backend, optimizer, averaging, case, lr, step, average_weights):
    rule, _, switch, reaction, inertia = OP_AVERAGINGS[averaging]
    averaging_args = dict(average_rule=rule, reaction=reaction, inertia=inertia, switch_to_average=switch)
    if optimizer is None:
        backend.average_(case["params"], case["segments"], case["average_state"], average_weights, **averaging_args)
        return
    op_name, hyper, _ = OP_OPTIMIZERS[optimizer]
    getattr(backend, op_name)(case["params"], case["grads"], case["segments"], case["optimizer_state"],
                              case["average_state"], lr, step, average_weights, **hyper, **averaging_args)


def _scalars(optimizer, averaging):
    step = OP_OPTIMIZERS[optimizer][2] if optimizer is not None else 0.0
    weights = OP_AVERAGINGS[averaging][1] or (0.0,)
    return (torch.tensor([LR], device=DEVICE), torch.tensor([step], device=DEVICE),
            torch.tensor(weights, device=DEVICE))


def _assert_same(actual, expected, dtype):
    for i, (a, e) in enumerate(zip(actual["bases"], expected["bases"])):
        if i % 2 == 0:
            assert_close(a, e, dtype)
        else:
            assert torch.equal(a, e)
    for a, e in zip(actual["optimizer_state"], expected["optimizer_state"]):
        assert_close(a, e, torch.float32)
    for a, e in zip(actual["average_state"], expected["average_state"]):
        assert_close(a, e, dtype)


def _check_op(ops, optimizer, averaging, dtype, layout, skew=0):
    actual = _case(optimizer, averaging, dtype, layout, skew)
    expected = _case(optimizer, averaging, dtype, layout, skew)
    scalars = _scalars(optimizer, averaging)
    _call(ops, optimizer, averaging, actual, *scalars)
    _call(_backends.REFERENCE, optimizer, averaging, expected, *scalars)
    _assert_same(actual, expected, dtype)


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averaging", list(OP_AVERAGINGS))
@pytest.mark.parametrize("optimizer", list(OP_OPTIMIZERS))
def test_step_op_matches_reference(ops, optimizer, averaging, dtype, layout):
    _check_op(ops, optimizer, averaging, dtype, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("averaging", list(OP_AVERAGINGS))
def test_average_op_matches_reference(ops, averaging, dtype, layout):
    _check_op(ops, None, averaging, dtype, layout)


@pytest.mark.parametrize("skew", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer, averaging", [("adamw_amsgrad", "ema"), ("sgd_nesterov", "lawa"),
                                                  ("sgd_heavy_ball", "belay_inertia"), (None, "sema_switch"),
                                                  (None, "lawa")])
def test_misaligned_state_offsets_match_reference(ops, optimizer, averaging, dtype, skew):
    _check_op(ops, optimizer, averaging, dtype, "mixed", skew)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_rows_than_the_grid_match_reference(ops, dtype):
    layout = [("dense", (1 + i % 9,)) for i in range(RESIDENT_BLOCKS + 37)] + [("dense", (2 * ROW + 3,))]
    _check_op(ops, "adamw", "ema", dtype, layout)


def test_empty_launch_is_a_no_op(ops):
    lr, step, weights = _scalars("adamw", "ema")
    table = torch.empty((0, 4), dtype=torch.int64, device=DEVICE)
    state = [torch.empty(0, device=DEVICE) for _ in range(2)]
    ops.adam_step_([], [], table, state, [torch.empty(0, device=DEVICE)], lr, step, weights,
                   **OP_OPTIMIZERS["adamw"][1], average_rule=RULE_EMA, reaction=0.0, inertia=0.0,
                   switch_to_average=False)


def test_lr_step_and_decays_are_read_at_every_launch(ops):
    """test_cuda.py's CUDA-graph replays without the graph: the same tensors of lr, step and EMA weights,
    changed in place between launches, against the reference from the same state each time."""
    dtype, optimizer, averaging = torch.bfloat16, "adamw_amsgrad", "ema"
    case = _case(optimizer, averaging, dtype, "mixed")
    expected = _case(optimizer, averaging, dtype, "mixed")
    lr, step, weights = torch.tensor([1e-2]), torch.tensor([1.0]), torch.tensor([1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(1)
    for lr_value, step_value, decay_weights in [(1e-2, 1.0, (1.0, 1.0, 1.0)), (3e-3, 2.0, (0.5, 0.1, 0.01)),
                                                (0.0, 3.0, (0.2, 0.02, 0.002)), (2e-2, 10.0, (0.05, 0.005, 0.0005))]:
        lr.fill_(lr_value)
        step.fill_(step_value)
        weights.copy_(torch.tensor(decay_weights))
        for grad in case["grads"]:
            grad.copy_(torch.randn(grad.shape, generator=g).to(dtype))
        for name in ("bases", "optimizer_state", "average_state"):
            for e, a in zip(expected[name], case[name]):
                e.copy_(a)
        _call(ops, optimizer, averaging, case, lr, step, weights)
        _call(_backends.REFERENCE, optimizer, averaging, expected, lr, step, weights)
        _assert_same(case, expected, dtype)
