"""A roofline prediction of the fused step on H100 and H200, from the compiled Triton kernels, before any GPU measures it.

Usage: ``python benchmarks/roofline.py [--json PATH]``. Without ``--json`` it compiles the configurations below for
sm_90 with ``.ci/triton_aot.py`` (about a minute); with it, it reads the rows a full ``triton_aot.py --json`` wrote.

For each configuration the bytes per parameter are those of the compiled kernel's aligned loop (every global access
the PTX makes per element, counted by ``.ci/triton_aot.py``). The baseline is torch's best two-op step at the same
parameter dtype: ``AdamW(fused=True)`` (or ``SGD(fused=True)``), whose state has the parameter's dtype, then one
``torch._foreach_lerp_(averages, params, 1 - beta)`` per EMA, each reading the average and the parameter and writing
the average (averages in the parameter dtype, as ``AveragedModel`` keeps them). Both are assumed to run at the same
streaming bandwidth, so the predicted speedup is the ratio of bytes, and a step of N parameters takes
N x bytes / bandwidth. The bandwidths are the copy bandwidths the H100 SXM and H200 reach (about 3.0 and 4.3 TB/s).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDWIDTH_TBPS = {"H100": 3.0, "H200": 4.3}
PARAMETERS = 1e9
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# (kernel name in .ci/triton_aot.py, what it is, torch's bytes per parameter as a multiple of the parameter size:
# the optimizer's reads and writes plus 3 per EMA; None where torch has no two-op equivalent).
CONFIGURATIONS = [
    ("fp32/adam/-", "AdamW", 7),
    ("fp32/adam/emax1", "AdamW + EMA", 7 + 3),
    ("fp32/adam/emax2", "AdamW + 2 EMAs", 7 + 6),
    ("fp32/adam/emax4", "AdamW + 4 EMAs", 7 + 12),
    ("fp32/adam/emax1+switch", "AdamW + Switch EMA (switch step)", None),
    ("fp32/adam/belay+vel", "AdamW + BELAY", None),
    ("fp32/adam/lawa", "AdamW + LAWA", None),
    ("fp32/sgd+mom/emax1", "SGD momentum + EMA", 5 + 3),
    # Averaging alone (fastavg.AveragedModel) reads θ and never writes it: 12 B per fp32 parameter, as torch's lerp.
    ("fp32/none/emax1", "average_ alone: EMA (AveragedModel)", 3),
    ("fp32/none/emax2", "average_ alone: 2 EMAs", 6),
    ("fp32/none/lawa", "average_ alone: LAWA snapshot", None),
    ("bf16/adam/emax1", "AdamW + EMA, bf16 parameters (fp32 state and average)", 7 + 3),
    ("bf16/sgd+mom/emax1", "SGD momentum + EMA, bf16 parameters", 5 + 3),
]


def compiled_rows(json_path):
    if json_path:
        with open(json_path) as f:
            return json.load(f)
    names = "|".join(name.replace("+", r"\+") for name, _, _ in CONFIGURATIONS)
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "rows.json")
        subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "triton_aot.py"), "--arch", "90", "--quiet",
                        "--only", f"^({names})$", "--json", out], check=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="rows written by .ci/triton_aot.py --json (default: compile them now)")
    args = parser.parse_args(argv)
    rows = {row["name"]: row for row in compiled_rows(args.json) if row["arch"] == 90 and "bytes" in row}
    missing = [name for name, _, _ in CONFIGURATIONS if name not in rows]
    if missing:
        sys.exit(f"roofline: no compiled sm_90 kernel named {', '.join(missing)} (did .ci/triton_aot.py rename them?)")
    print("| configuration | kernel | fastavg B/param | torch two-op B/param | predicted speedup |"
          + "".join(f" {gpu} ms per 1B params |" for gpu in BANDWIDTH_TBPS))
    print("|---|---|---:|---:|---:|" + "---:|" * len(BANDWIDTH_TBPS))
    for name, label, torch_multiple in CONFIGURATIONS:
        fused = rows[name]["bytes"]
        torch_bytes = torch_multiple * PARAM_BYTES[name.split("/")[0]] if torch_multiple else None
        ratio = f"{torch_bytes / fused:.2f}x" if torch_bytes else "-"
        times = "".join(f" {PARAMETERS * fused / (tbps * 1e12) * 1e3:.1f} |" for tbps in BANDWIDTH_TBPS.values())
        print(f"| {label} | `{name}` | {fused:g} | {torch_bytes if torch_bytes else '-'} | {ratio} |{times}")


if __name__ == "__main__":
    main()
