"""Reads ptxas's report, the PTX and the SASS of the step kernels; exits non-zero on a violated expectation.

    cuda_sass_check.py PTXAS_LOG [sm_80=SASS] [sm_90=SASS] [ptx=PTX]...

Floating-point contraction is off (nvcc --fmad=false): in the PTX, no fp32 fma, and every fp32 and fp64 add,
sub and mul carries an explicit rounding mode (.rn), which ptxas may not fuse into an FMA; in the SASS, no FFMA
in a kernel without a division or square root (SGD, average_), and in the Adam kernels the same FFMA count for
every averaging rule: those FFMA are the IEEE division and square root sequences (div.rn / sqrt.rn, correctly
rounded), not the rules' arithmetic.
"""
import re
import sys

KERNEL = re.compile(r"step_kernelILNS_9OptimizerE(\d)ELNS_11AverageRuleE(\d)E(f|13__nv_bfloat16|6__half)EE")
OPTIMIZERS = {"0": "average_", "1": "sgd", "2": "sgd_heavy_ball", "3": "adam"}
RULES = {"0": "none", "1": "ema", "2": "belay", "3": "lawa"}
DTYPES = {"f": "float32", "13__nv_bfloat16": "bfloat16", "6__half": "float16"}
ALL = {(o, r, d) for o in OPTIMIZERS.values() for r in RULES.values() for d in DTYPES.values()}
ARCHS = ("sm_80", "sm_90")
# 128-bit accesses of one pack of AdamW + EMA: param, grad, exp_avg, exp_avg_sq, average loaded; all but the
# grad stored. A pack is 16 bytes of parameters: 4 fp32 elements (one access per buffer), or 8 bf16/fp16
# elements (one access for param and grad, two for each fp32 buffer).
ADAMW_EMA_MINIMUM = {"float32": (5, 4), "bfloat16": (8, 7), "float16": (8, 7)}


def kernel_of(mangled):
    match = KERNEL.search(mangled)
    if match is None:
        return None
    o, r, d = match.groups()
    return OPTIMIZERS[o], RULES[r], DTYPES[d]


def name(kernel):
    return "%s+%s %s" % kernel


errors = []

# ptxas -v: per kernel and architecture, spills and registers.
report = {}
current = None
for line in open(sys.argv[1]):
    entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if entry:
        kernel = kernel_of(entry.group(1))
        current = (kernel, entry.group(2)) if kernel else None
        continue
    if current is None:
        continue
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if spills:
        report.setdefault(current, {})["spills"] = int(spills.group(1)) + int(spills.group(2))
    registers = re.search(r"Used (\d+) registers", line)
    if registers:
        report.setdefault(current, {})["registers"] = int(registers.group(1))
for arch in ARCHS:
    missing = ALL - {kernel for kernel, a in report if a == arch}
    if missing:
        errors.append("ptxas reports no %s kernel for %s" % (arch, ", ".join(sorted(map(name, missing)))))
    spilling = sorted(name(k) for (k, a), r in report.items() if a == arch and r.get("spills", 0))
    if spilling:
        errors.append("%s: register spills in %s" % (arch, ", ".join(spilling)))
    registers = [r["registers"] for (k, a), r in report.items() if a == arch and "registers" in r]
    if registers:
        print("check_cuda: ptxas %s: %d step kernels, %s spill; %d to %d registers" % (
            arch, len(registers), "none" if not spilling else "some", min(registers), max(registers)))

# PTX: no contraction left to ptxas.
for argument in sys.argv[2:]:
    kind, path = argument.split("=", 1)
    if kind != "ptx":
        continue
    text = open(path).read()
    parts = re.split(r"^(?:\.visible |\.weak )?\.entry (\S+?)\(", text, flags=re.M)
    found = set()
    f64_fma = f32_fma = f32_loose = 0
    for mangled, body in zip(parts[1::2], parts[2::2]):
        kernel = kernel_of(mangled)
        if kernel is None:
            continue
        found.add(kernel)
        fma = len(re.findall(r"\b(?:fma|mad)(?:\.rn)?(?:\.ftz)?(?:\.sat)?\.f32\b", body))
        loose = len(re.findall(r"\b(?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.f(?:32|64)\b", body))
        f64_fma += len(re.findall(r"\bfma\.rn\.f64\b", body))
        f32_fma += fma
        f32_loose += loose
        if fma or loose:
            errors.append("%s %s: %d fp32 fma and %d add/sub/mul without a rounding mode (contractible by ptxas): "
                          "compiled without --fmad=false?" % (path.rsplit("/", 1)[-1], name(kernel), fma, loose))
    missing = ALL - found
    if missing:
        errors.append("%s lacks %s" % (path, ", ".join(sorted(map(name, missing)))))
    print("check_cuda: PTX %s: %d step kernels; %d fp32 fma, %d add/sub/mul without .rn (both must be 0); %d "
          "fma.rn.f64 (libdevice's exp2, explicit)" % (path.rsplit("/", 1)[-1], len(found), f32_fma, f32_loose,
                                                      f64_fma))

# SASS: 128-bit global accesses on the vector path; no generic or local accesses; FFMA only in division and
# square root sequences.
for argument in sys.argv[2:]:
    arch, path = argument.split("=", 1)
    if arch == "ptx":
        continue
    text = open(path).read()
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    counts = {}
    for mangled, body in zip(parts[1::2], parts[2::2]):
        kernel = kernel_of(mangled)
        if kernel is None:
            continue
        counts[kernel] = {
            "LDG.E.128": len(re.findall(r"\bLDG\.E\.128\b", body)),
            "STG.E.128": len(re.findall(r"\bSTG\.E\.128\b", body)),
            "generic": len(re.findall(r"\s(?:LD|ST)\.E\b", body)),
            "local": len(re.findall(r"\b(?:LDL|STL)\b", body)),
            "FFMA": len(re.findall(r"\bFFMA\b", body)),
        }
    missing = ALL - set(counts)
    if missing:
        errors.append("%s SASS lacks %s" % (arch, ", ".join(sorted(map(name, missing)))))
    for kernel, c in sorted(counts.items()):
        if c["LDG.E.128"] == 0 or c["STG.E.128"] == 0:
            errors.append("%s %s: no 128-bit global load or store (LDG.E.128 %d, STG.E.128 %d)" % (
                arch, name(kernel), c["LDG.E.128"], c["STG.E.128"]))
        if c["generic"] or c["local"]:
            errors.append("%s %s: %d generic (LD/ST) and %d local (LDL/STL) accesses" % (
                arch, name(kernel), c["generic"], c["local"]))
    for dtype, (loads, stores) in ADAMW_EMA_MINIMUM.items():
        c = counts.get(("adam", "ema", dtype))
        if c is None:
            continue
        print("check_cuda: SASS %s adam+ema %s: %d LDG.E.128, %d STG.E.128 (pack needs >= %d, >= %d), "
              "%d generic, %d local" % (arch, dtype, c["LDG.E.128"], c["STG.E.128"], loads, stores, c["generic"],
                                        c["local"]))
        if c["LDG.E.128"] < loads or c["STG.E.128"] < stores:
            errors.append("%s adam+ema %s: fewer 128-bit accesses than one pack's buffers" % (arch, dtype))
    if counts:
        print("check_cuda: SASS %s: %d step kernels, each with LDG.E.128 and STG.E.128: %s" % (
            arch, len(counts), "yes" if all(c["LDG.E.128"] and c["STG.E.128"] for c in counts.values()) else "NO"))
    fused = sorted(name(k) for k, c in counts.items() if k[0] != "adam" and c["FFMA"])
    if fused:
        errors.append("%s: FFMA in kernels without a division or square root (contraction): %s" % (
            arch, ", ".join(fused)))
    adam_ffma = {}
    for (optimizer, rule, dtype), c in counts.items():
        if optimizer == "adam":
            adam_ffma.setdefault(dtype, {})[rule] = c["FFMA"]
    for dtype, by_rule in sorted(adam_ffma.items()):
        if len(set(by_rule.values())) > 1:
            errors.append("%s adam %s: FFMA counts differ between averaging rules (%s): the averaging arithmetic is "
                          "contracted" % (arch, dtype, ", ".join("%s %d" % item for item in sorted(by_rule.items()))))
    if counts:
        print("check_cuda: SASS %s: FFMA in %d SGD/average_ kernels: %d; in adam (any averaging rule): %s (IEEE "
              "division and sqrt sequences)" % (
                  arch, sum(1 for k in counts if k[0] != "adam"),
                  sum(c["FFMA"] for k, c in counts.items() if k[0] != "adam"),
                  ", ".join("%s %s" % (d, "/".join(str(v) for v in sorted(set(r.values()))))
                            for d, r in sorted(adam_ffma.items()))))

for error in errors:
    print("check_cuda: " + error, file=sys.stderr)
sys.exit(1 if errors else 0)
