#!/usr/bin/env python
"""Ahead-of-time compile of every ``_step_kernel`` specialization the Triton ops can launch, for GPUs we do not have.

Usage: ``python .ci/triton_aot.py [--arch 80,90] [--jobs 2] [--only REGEX] [--sample N] [--json PATH]``.
Exits non-zero on any violation (or when nothing could be compiled); prints one line per compiled kernel.

What is compiled. The launches are not listed by hand: the three op wrappers of :mod:`fastavg._triton`
(``_adam_step_``, ``_sgd_step_``, ``_average_``) are called on meta tensors over the product of every argument that
reaches them (parameter dtype, each optimizer flag and state size, averaging rule, number and dtypes of average
buffers, switch, GradScaler's ``grad_scale``/``found_inf`` present or not -- which must not change the kernel), with
the kernel launch captured instead of run. Calls a wrapper rejects are not launches; the
accepted ones are told apart by Triton's own launch binder (the ``specialization`` it computes from the arguments: the
constexprs, which pointers are None, the argument types and their 16-byte alignment), so two calls are one kernel
exactly when a real launch would reuse the compiled kernel. Each distinct launch is then compiled with
``JITFunction.warmup`` -- the real launch path: binder, option parsing, ``triton.compile``, ptxas -- for
``GPUTarget("cuda", arch, 32)`` behind a stand-in driver, with the options the op passes (``enable_fp_fusion=False``),
in a fresh cache, in a pool of processes.

What is asserted, per kernel:

* it compiles (Triton and ptxas) and was compiled without floating-point contraction: the launch option is off in its
  metadata, there is no ``fma``/``mad`` on f32/f16/bf16 anywhere in the PTX, and no ``fma`` of any type in the
  element loops. (The only FMAs left are ``fma.rn.f64`` inside libdevice's ``__nv_exp2``, which computes the Adam
  bias corrections 1 - beta^t in float64 once per program, before any element is touched.) Every f32 add, sub and
  mul of the rules is a ``.rn`` instruction, which ptxas never contracts;
* the aligned path -- the loop over a row's full blocks, taken when every address of the row is 16-byte aligned -- is
  the only loop with vector accesses, and every global access in it belongs to a stream of the launch (param, grad,
  or a flat state/average buffer, found by following the address back through the PTX to the kernel parameter or
  segment-table column it comes from) and moves 16 bytes (``v4.b32``). Per stream and per block iteration, a thread
  stores exactly ``elements per thread x element size / 16`` vectors into each buffer the step writes and loads as
  many from each buffer it reads (or none, where the compiler removed a read whose value is dead: the parameter of a
  plain switch, the gradient of a momentum-free SGD step that a switch then overwrites). Outside that loop every
  access is scalar (the masked tail and unaligned rows: a vector access there would be a misaligned access), and
  no value crosses shared memory there (the masked blocks keep one layout for loads, arithmetic and stores; on the
  aligned path a bf16/fp16 kernel does convert between the 8 parameter-dtype and the 4 fp32 elements a thread holds
  per 16-byte vector: the ``smem`` column counts those shared-memory accesses);
* the global bytes per element of the aligned loop, summed over its accesses, are at most the minimum of the
  configuration (``minimum_bytes``)::

      minimum = 2 P                 the parameter, read and written  (P = 4, 2, 2 bytes for fp32, bf16, fp16);
                                    P only (read) for averaging alone without BELAY or a switch, which never
                                    stores the parameter (the aligned loop must then hold no store into it)
              + P                   the gradient, read (a step op, not average_)
              + 8 x (fp32 buffers read and written: optimizer state, averages, BELAY velocity, LAWA sum)
              + 4 x (fp32 buffers only read: the average a plain switch copies into the parameter)
              + 2 P                 LAWA's ring slot, read and written (parameter dtype)

* registers and spills from the ptxas report (``ptxas -v``, as Triton runs it): no spill at all in the common
  configurations (no amsgrad, at most 4 averages); at most ``SPILL_BUDGET`` bytes of spill stores plus loads in
  the others (amsgrad, or 5 to 8 EMAs).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
SPILL_BUDGET = 64  # bytes of spill stores + loads allowed outside the common configurations
VECTOR_BYTES = 16
# Environment that would change what is compiled: the interpreter, and Triton's global contraction switches (the ops
# must pin contraction themselves).
IGNORED_ENV = ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION")

OPTIMIZER_NAMES = {0: "none", 1: "sgd", 2: "heavy_ball", 3: "adam"}
RULE_NAMES = {0: "none", 1: "ema", 2: "belay", 3: "lawa"}
RULE_BELAY = 2  # fastavg.averaging.RULE_BELAY
STREAMS = ["param", "grad", "state_0", "state_1", "state_2"] + [f"average_{k}" for k in range(8)] + [
    "average_velocity", "lawa_sum", "lawa_ring_slot"]
PARAM_DTYPE_STREAMS = {"param", "grad", "lawa_ring_slot"}


# --- the launches the ops can make ----------------------------------------------------------------------------------
def _op_calls():
    """Every call of the op wrappers worth trying: ``{"op", "dtype", ...}`` descriptions, rebuilt by ``_run_op``.

    Floats that only scale (lr, betas, eps, reaction, ...) take one value; everything that is a flag, a size or a
    dtype takes each of its values (sizes one beyond what the wrappers accept, to let them reject it)."""
    from fastavg._backends import KERNEL_DTYPES
    from fastavg.averaging import MAX_AVERAGES

    dtypes = [str(d).replace("torch.", "") for d in KERNEL_DTYPES]
    averaging = [dict(average_rule=rule, averages=averages, ring=ring, switch=switch)
                 for rule in range(5) for averages in range(MAX_AVERAGES + 2) for ring in (False, True)
                 for switch in (False, True) if not (ring and averages < 2)]
    adam = [dict(op="adam_step_", state=state, amsgrad=amsgrad, decoupled_weight_decay=decoupled, maximize=maximize,
                 weight_decay=0.01)
            for state in (1, 2, 3) for amsgrad, decoupled, maximize in itertools.product((False, True), repeat=3)]
    sgd = [dict(op="sgd_step_", state=state, momentum=momentum, nesterov=nesterov, maximize=maximize,
                heavy_ball=heavy_ball, weight_decay=0.01, dampening=0.0)
           for state in (0, 1) for momentum in (0.0, 0.9)
           for nesterov, maximize, heavy_ball in itertools.product((False, True), repeat=3)]
    average = [dict(op="average_")]
    for dtype, opt, avg in itertools.product(dtypes, adam + sgd + average, averaging):
        # GradScaler's grad_scale and found_inf (the step ops take both, average_ found_inf): the same kernels must
        # serve calls with and without them (``launches`` asserts it), so they add calls but no kernel.
        for scaler in (False, True):
            yield dict(opt, dtype=dtype, scaler=scaler, **avg)


_META = {}


def _meta(dtype, shape, k=0):
    """A meta tensor (no memory; its data_ptr is 0, aligned like the CUDA allocator's), the same on every call."""
    import torch
    key = (dtype, shape, k)
    if key not in _META:
        _META[key] = torch.empty(shape, dtype=dtype, device="meta")
    return _META[key]


class _Capture:
    """Stands in for torch.library.wrap_triton: records the launch instead of making it."""
    launch = None

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(**kwargs):
            _Capture.launch = (self.kernel, kwargs)
        return launch


def _run_op(call):
    """Runs the op wrapper of ``call`` on meta tensors; returns ``(kernel, launch kwargs)``, or None if rejected."""
    import torch

    from fastavg import _triton

    dtype = getattr(torch, call["dtype"])
    params, grads = [_meta(dtype, 1000)], [_meta(dtype, 1000, 1)]
    segments = _meta(torch.int64, (1, 4))

    def flat(k, dtype=torch.float32):
        return _meta(dtype, 1024, k)

    average_state = [flat(10 + k, dtype if call["ring"] and k == 1 else torch.float32)
                     for k in range(call["averages"])]
    lr, step, weights = _meta(torch.float32, 1), _meta(torch.float32, 1, 1), _meta(torch.float32, 16)
    _Capture.launch = None
    averaging = (call["average_rule"], 0.5, 0.25, call["switch"])
    scaler = dict(found_inf=_meta(torch.float32, (), 21)) if call["scaler"] else {}
    if call["scaler"] and call["op"] != "average_":
        scaler.update(grad_scale=_meta(torch.float32, (), 20))
    wrap_triton, _triton.wrap_triton = _triton.wrap_triton, _Capture
    try:
        if call["op"] == "adam_step_":
            _triton._adam_step_(params, grads, segments, [flat(k) for k in range(call["state"])], average_state, lr,
                                step, weights, 0.9, 0.999, 1e-8, call["weight_decay"], call["decoupled_weight_decay"],
                                call["amsgrad"], call["maximize"], *averaging, **scaler)
        elif call["op"] == "sgd_step_":
            _triton._sgd_step_(params, grads, segments, [flat(k) for k in range(call["state"])], average_state, lr,
                               step, weights, call["momentum"], call["dampening"], call["weight_decay"],
                               call["nesterov"], call["maximize"], call["heavy_ball"], *averaging, **scaler)
        else:
            _triton._average_(params, segments, average_state, weights, *averaging, **scaler)
    except RuntimeError:
        return None  # the wrapper rejects these arguments: no launch
    finally:
        _triton.wrap_triton = wrap_triton
    return _Capture.launch


class _Driver:
    """A stand-in for Triton's CUDA driver: all the launch path asks of it without a device (device ``arch``, so
    each architecture keeps kernels of its own)."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0


def _use_driver(arch):
    from triton.runtime.driver import driver
    driver.set_active(_Driver(arch))


def _specialization(kernel, kwargs):
    """What Triton's launch binder makes of these arguments: equal for two launches exactly when they share a
    compiled kernel (options aside: every launch passes the same)."""
    binder = kernel.device_caches[ARCHS[0]][-1]
    _, specialization, _ = binder(**kwargs)
    return repr(specialization)


def launches(only=None):
    """``[(name, call)]``: one op call per distinct kernel, with the number of op calls tried and accepted."""
    _use_driver(ARCHS[0])
    seen, scaled, tried, accepted = {}, set(), 0, 0
    for call in _op_calls():
        tried += 1
        launch = _run_op(call)
        if launch is None:
            continue
        accepted += 1
        kernel, kwargs = launch
        key = _specialization(kernel, kwargs)
        if call["scaler"]:
            scaled.add(key)
        elif key not in seen:
            seen[key] = (config_name(kwargs), call)
    assert scaled and scaled <= set(seen), "GradScaler's tensors change which kernel a step compiles to"
    names = [name for name, _ in seen.values()]
    assert len(set(names)) == len(names), "two distinct kernels share a name: config_name misses a constexpr"
    selected = [(name, call) for name, call in seen.values() if only is None or re.search(only, name)]
    return selected, tried, accepted


def config_name(kwargs):
    opt = OPTIMIZER_NAMES[kwargs["OPTIMIZER"]]
    opt += "+mom" if kwargs["HAS_MOMENTUM_BUFFER"] else ""
    opt += "+ams" if kwargs["AMSGRAD"] else ""
    rule = kwargs["AVERAGE_RULE"]
    avg = RULE_NAMES[rule] if rule else ""
    avg += f"x{kwargs['NUM_AVERAGES']}" if rule == 1 else ""
    avg += "+vel" if kwargs["HAS_VELOCITY"] else ""
    avg = "+".join(filter(None, [avg, "switch" if kwargs["SWITCH"] else ""])) or "-"
    return f"{kwargs['DTYPE'].name}/{opt}/{avg}"


def expected_streams(kwargs):
    """``{stream: (element bytes, read, written)}`` of a launch: the pointers its op passes, and what the step does
    with each (the parameter is always read, and written only when the step can change it -- an optimizer, BELAY or
    a switch: averaging alone with EMA, SWA, LAWA or no rule leaves it unwritten; a plain switch only reads its
    average)."""
    param_bytes = kwargs["DTYPE"].primitive_bitwidth // 8
    writes_param = kwargs["OPTIMIZER"] != 0 or kwargs["AVERAGE_RULE"] == RULE_BELAY or bool(kwargs["SWITCH"])
    streams = {"param": (param_bytes, True, writes_param)}
    if kwargs["OPTIMIZER"] != 0:
        streams["grad"] = (param_bytes, True, False)
    for name in STREAMS[2:]:
        if kwargs.get(f"{name}_ptr") is not None:
            size = param_bytes if name in PARAM_DTYPE_STREAMS else 4
            written = not (kwargs["AVERAGE_RULE"] == 0 and name.startswith("average_"))
            streams[name] = (size, True, written)
    return streams


def minimum_bytes(streams):
    """The global bytes per element a step of these streams must move: each read once, each written once."""
    return sum(size * (int(read) + int(written)) for size, read, written in streams.values())


# --- compiling one launch -------------------------------------------------------------------------------------------
def _compile(task):
    """In a pool process: compiles ``task = (name, call, arch, keep_asm)``; returns its table row."""
    name, call, arch, keep_asm = task
    from triton import knobs

    row = dict(name=name, arch=arch, violations=[])
    started = time.time()
    try:
        kernel, kwargs = _run_op(call)
        _use_driver(arch)
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton after each ptxas run
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(grid=(1,), **kwargs)
        kernel.device_caches.clear()  # one kernel per task: keep no compiled kernels around
    except Exception as error:  # a compile error is a result, not a crash of the audit
        row["violations"].append(f"compile error: {type(error).__name__}: {str(error).strip()[-2000:]}")
        row["seconds"] = time.time() - started
        return row
    row["seconds"] = time.time() - started
    analyse(row, kernel, kwargs, compiled, log.getvalue())
    if keep_asm:
        row["asm"] = {k: compiled.asm[k] for k in ("ttir", "ptx")}
    return row


def _ptxas_report(log):
    """Registers, stack frame and spill bytes of the ``ptxas -v`` report."""
    report = {}
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if spills:
        report.update(stack=int(spills[1]), spill_stores=int(spills[2]), spill_loads=int(spills[3]))
    if registers:
        report.update(registers=int(registers[1]))
    return report


# --- reading the PTX ------------------------------------------------------------------------------------------------
_INSTRUCTION = re.compile(r"^(?:@(!?%\w+)\s+)?([a-z][\w.:]*)\s*(.*?);?\s*$")
_ACCESS = re.compile(r"^(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.([bfus])(\d+)$")


def _operands(text):
    """Operands of one instruction, split at top-level commas (``{...}`` vectors and ``[...]`` addresses whole)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_ptx(ptx):
    """``(instructions, loops)``: instructions as dicts (block, predicate, opcode, operands), in order; ``loops`` maps
    each basic block to the header of the loop it is in (LLVM's ``Loop Header`` / ``in Loop: Header=`` comments)."""
    instructions, loops, block = [], {}, "entry"
    lines = ptx.splitlines()
    for i, raw in enumerate(lines):
        line = raw.strip()
        label = re.match(r"^\$L__(BB\d+_\d+):\s*(//.*)?$", line) or re.match(r"^//\s*%(bb\.\d+):\s*(//.*)?$", line)
        if label:
            block = label[1]
            comment = label[2] or ""
            header = re.search(r"in Loop: Header=(BB\d+_\d+)", comment)
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if "Loop Header" in comment or ("Loop Header" in following and following.startswith("//")):
                loops[block] = block
            elif header:
                loops[block] = header[1]
            continue
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "$", "{", "}")):
            continue
        match = _INSTRUCTION.match(line)
        if match:
            instructions.append(dict(block=block, predicate=match[1], opcode=match[2],
                                     operands=_operands(match[3])))
    return instructions, loops


def _registers(operand):
    return re.findall(r"%\w+", operand)


def _address(operand):
    """``(register, displacement)`` of an address operand ``[ %rd1 + 8 ]``."""
    match = re.match(r"^\[\s*(%\w+)\s*(?:\+\s*(-?\d+))?\s*\]$", operand)
    return (match[1], int(match[2] or 0)) if match else (None, 0)


class Dataflow:
    """Where the value of a PTX register comes from: the kernel parameters and segment-table columns it depends on."""

    def __init__(self, instructions, param_names):
        self.param_names = param_names
        self.defs = {}
        for ins in instructions:
            if ins["opcode"].startswith(("st.", "bra", "ret", "bar")) or not ins["operands"]:
                continue
            for register in _registers(ins["operands"][0]):
                self.defs.setdefault(register, []).append(ins)
        self.table_param = param_names.index("segments_ptr")
        self._roots = {}

    def constant_offset(self, register, seen=()):
        """The constant a register adds to its base, along a chain of ``add.s64 r, base, imm``."""
        defs = self.defs.get(register, [])
        if len(defs) == 1 and defs[0]["opcode"] in ("add.s64", "add.u64") and register not in seen:
            base, imm = defs[0]["operands"][1:3]
            if re.fullmatch(r"-?\d+", imm):
                return int(imm) + self.constant_offset(base, seen + (register,))
        return 0

    def roots(self, register):
        """``{("param", name)}`` for kernel parameters, ``{("row", column)}`` for segment-table loads."""
        if register in self._roots:
            return self._roots[register]
        self._roots[register] = set()  # cycles (loop-carried registers) end here
        found = set()
        for ins in self.defs.get(register, []):
            opcode, operands = ins["opcode"], ins["operands"]
            param = re.search(r"\[\s*\w+_param_(\d+)\s*\]", " ".join(operands))
            if opcode.startswith("ld.param") and param:
                index = int(param[1])
                found.add(("param", self.param_names[index] if index < len(self.param_names) else f"#{index}"))
            elif opcode.startswith("ld.global"):
                base, displacement = _address(operands[-1])
                if base is not None and ("param", "segments_ptr") in self.roots(base):
                    found.add(("row", (displacement + self.constant_offset(base)) // 8))
                else:
                    found.add(("loaded", None))
            else:
                for operand in operands[1:]:
                    for source in _registers(operand):
                        found |= self.roots(source)
        self._roots[register] = found
        return found

    def stream(self, register):
        """The stream an address points into, or None when it is not exactly one."""
        names = {name[:-4] for kind, name in self.roots(register) if kind == "param" and name.endswith("_ptr")}
        names.discard("segments")
        rows = {column for kind, column in self.roots(register) if kind == "row"}
        names |= {{0: "param", 1: "grad"}[c] for c in rows if c in (0, 1)}
        return names.pop() if len(names) == 1 else None


def global_accesses(instructions, dataflow, loops):
    accesses = []
    for ins in instructions:
        match = _ACCESS.match(ins["opcode"])
        if not match:
            continue
        kind, vector, bits = match[1], int(match[2] or 1), int(match[4])
        address = ins["operands"][0 if kind == "st" else -1]
        register, _ = _address(address)
        accesses.append(dict(kind=kind, bytes=vector * bits // 8, vector=vector > 1, predicated=bool(ins["predicate"]),
                             stream=dataflow.stream(register) if register else None,
                             loop=loops.get(ins["block"])))
    return accesses


# --- the checks -----------------------------------------------------------------------------------------------------
def analyse(row, kernel, kwargs, compiled, ptxas_log):
    """Fills ``row`` with what the compiled kernel does, and ``row["violations"]`` with what it must not."""
    bad = row["violations"].append
    ptx = compiled.asm["ptx"]
    metadata = compiled.metadata
    streams = expected_streams(kwargs)
    row.update(minimum=minimum_bytes(streams), num_warps=metadata.num_warps, **_ptxas_report(ptxas_log))
    common = not kwargs["AMSGRAD"] and kwargs["NUM_AVERAGES"] <= 4
    row["common"] = common

    # Contraction.
    if getattr(metadata, "enable_fp_fusion", None) is not False:
        bad(f"compiled with enable_fp_fusion={getattr(metadata, 'enable_fp_fusion', None)}: the op must pass False")
    instructions, loops = parse_ptx(ptx)
    fused = [ins["opcode"] for ins in instructions if re.match(r"^(fma|mad)\.[a-z.]*(f32|f16|bf16)", ins["opcode"])]
    fused_in_loops = [ins["opcode"] for ins in instructions
                      if ins["opcode"].startswith("fma") and loops.get(ins["block"])]
    # Without a rounding modifier, ptxas may fuse a multiply and an add (unless run with --fmad=false).
    contractible = [ins["opcode"] for ins in instructions if re.match(r"^(add|sub|mul)(\.ftz)?\.f32$", ins["opcode"])]
    row["fma_f64"] = sum(ins["opcode"].startswith("fma.rn.f64") for ins in instructions)
    if fused or fused_in_loops or contractible:
        bad(f"contracted arithmetic: {len(fused)} f32/f16 fma/mad, {len(fused_in_loops)} fma in element loops, "
            f"{len(contractible)} f32 add/sub/mul without .rn")

    # The aligned loop: the only one with vector accesses, nothing but 16-byte accesses of the launch's streams.
    param_names = [p.name for p in kernel.params if not p.is_constexpr and kwargs[p.name] is not None]
    accesses = global_accesses(instructions, Dataflow(instructions, param_names), loops)
    vector_loops = {a["loop"] for a in accesses if a["vector"]}
    if len(vector_loops) != 1 or None in vector_loops:
        bad(f"vector accesses in {len(vector_loops)} places ({sorted(map(str, vector_loops))}), expected one loop")
        return
    aligned = vector_loops.pop()
    body = [a for a in accesses if a["loop"] == aligned]
    per_thread = kwargs["BLOCK"] // (32 * metadata.num_warps)
    row["bytes"] = sum(a["bytes"] for a in body) / per_thread
    counts, wrong = {}, {}
    for a in body:
        if a["stream"] in streams and a["bytes"] == VECTOR_BYTES and not a["predicated"]:
            counts[(a["stream"], a["kind"])] = counts.get((a["stream"], a["kind"]), 0) + 1
        else:  # not a stream of the launch, not a 16-byte vector, or masked
            what = (a["stream"] if a["stream"] in streams else f"an address not in exactly one stream ({a['stream']})",
                    a["kind"], a["bytes"], a["predicated"])
            wrong[what] = wrong.get(what, 0) + 1
    for (stream, kind, size, predicated), count in wrong.items():
        bad(f"aligned path: {count} {'masked ' if predicated else ''}{size}-byte "
            f"{'loads from' if kind == 'ld' else 'stores into'} {stream}")
    expected_loads = expected_stores = loads = stores = 0
    elided = []
    for stream, (size, read, written) in streams.items():
        vectors = per_thread * size // VECTOR_BYTES
        got_ld, got_st = counts.get((stream, "ld"), 0), counts.get((stream, "st"), 0)
        expected_loads += vectors * read
        expected_stores += vectors * written
        loads, stores = loads + got_ld, stores + got_st
        if read and not any(a["stream"] == stream and a["kind"] == "ld" for a in body):
            elided.append(stream)  # a read the compiler proved dead: fewer bytes, nothing wrong
        elif got_ld != vectors * read:
            bad(f"aligned path: {got_ld} vector loads of {stream}, expected {vectors * read}")
        if got_st != vectors * written:
            bad(f"aligned path: {got_st} vector stores into {stream}, expected {vectors * written}")
    row.update(loads=loads, stores=stores, expected_loads=expected_loads, expected_stores=expected_stores,
               elided=elided)
    # A parameter the step cannot change (averaging alone without BELAY or a switch) is never stored, on any path.
    if not streams["param"][2]:
        param_stores = [a for a in accesses if a["kind"] == "st" and a["stream"] == "param"]
        if param_stores:
            bad(f"{len(param_stores)} stores into param, which this step never changes")
    outside = [a for a in accesses if a["loop"] != aligned and a["vector"]]
    if outside:
        bad(f"{len(outside)} vector accesses outside the aligned loop")
    # Shared memory: only where Triton's layouts for the parameter dtype and fp32 differ (bf16/fp16: 8 elements per
    # thread in a 16-byte vector, fp32: 4), on the aligned path; the masked path has one layout throughout.
    shared = [ins for ins in instructions if ins["opcode"].startswith(("ld.shared", "st.shared"))]
    row["shared"] = len(shared)
    if any(loops.get(ins["block"]) != aligned for ins in shared):
        bad(f"{sum(loops.get(ins['block']) != aligned for ins in shared)} shared-memory accesses outside the aligned "
            f"loop: a layout conversion on the masked path")
    if row["bytes"] > row["minimum"]:
        bad(f"{row['bytes']:g} global bytes per element on the aligned path, minimum {row['minimum']}")

    # Spills.
    if "spill_stores" not in row:
        bad("no ptxas report (registers, spills) captured")
    else:
        spilled = row["spill_stores"] + row["spill_loads"]
        if common and spilled:
            bad(f"{spilled} bytes of spills in a common configuration (no amsgrad, <= 4 averages)")
        elif spilled > SPILL_BUDGET:
            bad(f"{spilled} bytes of spills, budget {SPILL_BUDGET}")


# --- the run --------------------------------------------------------------------------------------------------------
def _line(row):
    if "loads" not in row:
        return f"sm_{row['arch']}  {row['name']:<34} " + ("; ".join(row["violations"])[:300] or "?")
    spills = f"{row.get('spill_stores', '?')}/{row.get('spill_loads', '?')}"
    elided = f"  (dead reads removed: {','.join(row['elided'])})" if row["elided"] else ""
    flag = "  FAIL" if row["violations"] else ""
    return (f"sm_{row['arch']}  {row['name']:<34} v4 ld {row['loads']:>2}/{row['expected_loads']:<2} "
            f"st {row['stores']:>2}/{row['expected_stores']:<2} B/elt {row['bytes']:>3g}/{row['minimum']:<3} "
            f"regs {row.get('registers', '?'):>3} spill {spills:<5} smem {row['shared']:>2}{elided}{flag}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--only", help="regular expression: compile the configurations whose name matches")
    parser.add_argument("--sample", type=int, help="compile every N-th configuration only (a quick check)")
    parser.add_argument("--json", help="write the rows (with PTX and TTIR when --asm) to this file")
    parser.add_argument("--asm", action="store_true", help="keep each kernel's PTX and TTIR in --json")
    parser.add_argument("--quiet", action="store_true", help="print violations and the summary only")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for arch in archs:
            get_ptxas(arch).path
    except Exception as error:  # no NVIDIA backend or no ptxas: nothing to compile with
        print(f"CANNOT COMPILE: Triton {_triton_version()} has no NVIDIA compiler here ({type(error).__name__}: "
              f"{error})")
        return 2

    started = time.time()
    configs, tried, accepted = launches(args.only)
    total = len(configs)
    if args.sample:
        configs = configs[::args.sample]
    print(f"triton {_triton_version()}: {tried} op calls tried, {accepted} launches, {total} distinct kernels "
          f"({len(configs)} selected) x sm_{', sm_'.join(map(str, archs))}; enumerated in "
          f"{time.time() - started:.1f} s", flush=True)
    # Big kernels first, so that the pool does not end on one.
    weight = {name: call.get("averages", 0) + 4 * call.get("amsgrad", False) + 2 * (call["op"] == "adam_step_")
              for name, call in configs}
    tasks = [(name, call, arch, args.asm) for arch in archs
             for name, call in sorted(configs, key=lambda c: -weight[c[0]])]
    rows = []
    # fork: the pool starts with torch, Triton and fastavg imported (nothing here has started threads or a device).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(args.jobs, initializer=_worker_init) as pool:
        for row in pool.imap_unordered(_compile, tasks):
            rows.append(row)
            if row["violations"] or not args.quiet:
                print(_line(row), flush=True)
                for violation in row["violations"]:
                    print(f"    VIOLATION: {violation}", flush=True)
    failed = [r for r in rows if r["violations"]]
    for arch in archs:
        mine = [r for r in rows if r["arch"] == arch and "loads" in r]
        if not mine:
            continue
        spilled = [r for r in mine if r.get("spill_stores", 0) + r.get("spill_loads", 0)]
        worst = max((r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in mine), default=0)
        print(f"sm_{arch}: {len([r for r in rows if r['arch'] == arch])} kernels, "
              f"{len([r for r in rows if r['arch'] == arch and r['violations']])} with violations; "
              f"{sum(r['bytes'] == r['minimum'] for r in mine)} at the minimum bytes/elt, "
              f"{sum(r['bytes'] < r['minimum'] for r in mine)} below it (dead reads removed); "
              f"registers {min(r.get('registers', 0) for r in mine)}-{max(r.get('registers', 0) for r in mine)}; "
              f"{len(spilled)} spill ({sum(not r['common'] for r in spilled)} of them uncommon), worst {worst} B; "
              f"{sum(r['seconds'] for r in rows if r['arch'] == arch):.0f} s of compiling summed over the kernels")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    print(f"{len(rows)} kernels compiled in {time.time() - started:.0f} s, {len(failed)} with violations",
          flush=True)
    return 1 if failed or not rows else 0


def _triton_version():
    import triton
    return triton.__version__


def _worker_init():
    sys.path.insert(0, ROOT)


if __name__ == "__main__":
    for name in IGNORED_ENV:
        os.environ.pop(name, None)
    cache = tempfile.mkdtemp(prefix="fastavg-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # compile every kernel for real; the pool's processes inherit it
    sys.path.insert(0, ROOT)
    try:
        status = main()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    sys.exit(status)
