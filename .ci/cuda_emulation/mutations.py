"""Mutation self-test of the CUDA emulation harness: injects known bugs into a temporary copy of
csrc/fastavg_cuda.cu, builds the sanitized harness against each copy and shows that it fails on every one.

    python .ci/cuda_emulation/mutations.py --build-dir DIR [--jobs N]

DIR holds the sanitized harness's other objects (rt.o, harness.o, from run.sh) and receives the mutants.
Each mutation replaces one snippet that must occur exactly once in the source (so that a change of the kernel
that removes it is noticed here, not silently skipped). A mutant must compile, and its harness must exit
non-zero through one of the detectors the mutation expects; the table printed says which fired. Exits non-zero
if any mutant is missed, caught only by an unexpected detector, or does not apply or build.
"""
import argparse
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "fastavg_cuda.cu")

# name, what the bug is, original snippet, mutated snippet, detectors expected to catch it
MUTATIONS = [
    ("out-of-bounds read",
     "thread 0 reads all kMaxAverages averaging weights, past the end of a shorter weights tensor",
     "shared_weights[k] = k < count ? b.average_weights[k] : 0.f;",
     "shared_weights[k] = b.average_weights[k];",
     {"AddressSanitizer"}),
    ("misaligned vector path",
     "the alignment check forgets the grad: a row whose grad alone is off 16 bytes takes the vector path",
     "uintptr_t bits = address_bits(row.param) | address_bits(row.grad);",
     "uintptr_t bits = address_bits(row.param);",
     {"UndefinedBehaviorSanitizer"}),
    ("off-by-one tail",
     "the element loop runs to numel inclusive: one element past every row",
     "for (int64_t element = scalar_first + lane; element < row.numel; element += lanes) {",
     "for (int64_t element = scalar_first + lane; element <= row.numel; element += lanes) {",
     {"emulator", "AddressSanitizer", "scalar loop"}),
    ("tail in the vector body",
     "the pack count rounds up: the last pack of a row with a tail reaches past the row",
     "const int64_t num_packs = row.numel / kPackElements;",
     "const int64_t num_packs = (row.numel + kPackElements - 1) / kPackElements;",
     {"emulator", "AddressSanitizer", "scalar loop"}),
    ("missing __syncthreads",
     "no barrier between thread 0 writing the shared step scalars and weights and the block reading them",
     "  __syncthreads();\n  if (shared_skip) return;",
     "  if (shared_skip) return;",
     {"scalar loop", "thread order"}),
    ("vector path never taken",
     "the alignment check always fails: aligned rows take the scalar path (same numbers, a fraction of the "
     "bandwidth on a GPU)",
     "return bits % kVectorBytes == 0;",
     "return bits == ~bits;",
     {"path check"}),
    ("param stored by averaging alone",
     "the parameter is stored back on every step, also by averaging alone, which cannot change it (the same "
     "numbers, 4 more bytes per fp32 element on a GPU)",
     "if (writes_param(O, R, R != AverageRule::lawa && c.switch_to_average)) {",
     "if (true) {",
     {"path check"}),
    ("param never stored",
     "the store of θ is skipped whenever no optimizer runs: BELAY's pull and a switch are lost",
     "if (writes_param(O, R, R != AverageRule::lawa && c.switch_to_average)) {",
     "if (O != Optimizer::none) {",
     {"scalar loop", "path check"}),
    ("grid stride",
     "blocks stride over the rows by the block size instead of the grid size: rows are skipped when the grid "
     "is smaller than the table",
     "index += gridDim.x) {",
     "index += blockDim.x) {",
     {"scalar loop"}),
]

# Which detector a harness run's output shows, first match wins.
DETECTORS = [
    ("AddressSanitizer", re.compile(r"ERROR: AddressSanitizer")),
    ("UndefinedBehaviorSanitizer", re.compile(r"runtime error:")),
    ("emulator", re.compile(r"^cuda_emulation:", re.M)),
    ("scalar loop", re.compile(r"differs from the scalar loop")),
    ("thread order", re.compile(r"differs from the first schedule")),
    ("path check", re.compile(r"took the wrong path")),
]


def detector(output):
    for name, pattern in DETECTORS:
        if pattern.search(output):
            return name
    return None


def first_line(output, name):
    """The line of `output` that shows detector `name` firing, shortened."""
    pattern = dict(DETECTORS)[name]
    for line in output.splitlines():
        if pattern.search(line):
            line = re.sub(r"^(harness|cuda_emulation): |^==\d+==ERROR: |runtime error: ", "", line)
            line = re.sub(r" at pc 0x[0-9a-f]+ bp 0x[0-9a-f]+ sp 0x[0-9a-f]+", "", line)
            return line if len(line) <= 220 else line[:217] + "..."
    return ""


def run_mutant(index, mutation, build_dir, compile_command, link_command, run_timeout):
    name, _, original, mutated, expected = mutation
    source = open(SOURCE).read()
    count = source.count(original)
    if count != 1:
        return dict(name=name, ok=False, verdict=f"snippet found {count} times in csrc/fastavg_cuda.cu (expected once)")
    mutant_dir = os.path.join(build_dir, f"mutant{index}")
    os.makedirs(mutant_dir, exist_ok=True)
    # Next to the original, so that #include "fastavg_step.h" resolves as it does for the original.
    mutant_source = os.path.join(mutant_dir, "fastavg_cuda.cu")
    with open(mutant_source, "w") as f:
        f.write(f'#line 1 "csrc/fastavg_cuda.cu (mutant: {name})"\n' + source.replace(original, mutated))
    started = time.monotonic()
    obj = os.path.join(mutant_dir, "kernels.o")
    binary = os.path.join(mutant_dir, "harness")
    build = subprocess.run(compile_command + ["-c", mutant_source, "-o", obj], capture_output=True, text=True, cwd=ROOT)
    if build.returncode == 0:
        build = subprocess.run(link_command + [obj, "-o", binary], capture_output=True, text=True, cwd=ROOT)
    if build.returncode != 0:
        return dict(name=name, ok=False, verdict="the mutant does not build:\n" + build.stderr[-2000:])
    built = time.monotonic()
    try:
        run = subprocess.run([binary, "--fail-fast"], capture_output=True, text=True, timeout=run_timeout,
                             cwd=ROOT)
        output, code = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as timeout:
        output, code = (timeout.stdout or b"").decode() + (timeout.stderr or b"").decode(), "timeout"
    found = detector(output) if code != 0 else None
    ok = code not in (0, "timeout") and found in expected
    verdict = (f"caught by {found}: {first_line(output, found)}" if found else
               f"NOT CAUGHT (exit status {code})")
    if found and found not in expected:
        verdict += f" -- expected {' or '.join(sorted(expected))}"
    return dict(name=name, ok=ok, verdict=verdict, exit=code, build_s=built - started,
                run_s=time.monotonic() - built, output=output)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--compile", required=True, help="the compile command of a kernel object, without -c/-o")
    parser.add_argument("--link", required=True, help="the link command, without the kernel object and -o")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a mutant's harness may run")
    args = parser.parse_args()
    compile_command, link_command = shlex.split(args.compile), shlex.split(args.link)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda item: run_mutant(item[0], item[1], args.build_dir, compile_command,
                                                          link_command, args.timeout),
                                enumerate(MUTATIONS)))
    width = max(len(m[0]) for m in MUTATIONS)
    print("mutations: %-*s  %s" % (width, "bug injected", "result"))
    for mutation, result in zip(MUTATIONS, results):
        timing = f" [{result['build_s']:.0f} s build, {result['run_s']:.1f} s run]" if "build_s" in result else ""
        print("mutations: %-*s  %s%s" % (width, mutation[0], result["verdict"], timing))
        if not result["ok"] and result.get("output"):
            print("mutations: output of the missed mutant '%s':\n%s" % (mutation[0], result["output"][-3000:]))
    missed = [r["name"] for r in results if not r["ok"]]
    if missed:
        print("mutations: FAILED: not caught as expected: " + ", ".join(missed), file=sys.stderr)
        return 1
    print(f"mutations: all {len(results)} injected bugs caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
