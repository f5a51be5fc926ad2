"""How fastavg's compiled extension is built, shared by setup.py (at install) and :mod:`fastavg._extension` (just
in time, when the install has no usable extension): the sources, the flags, and where the CUDA toolkit is.

setup.py loads this file by path, before torch may be importable, so nothing here imports torch or fastavg.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

CPU_SOURCES = ["fastavg_ops.cpp", "fastavg_eager.cpp", "fastavg_cpu.cpp", "fastavg_cpu_avx2.cpp",
               "fastavg_cpu_avx512.cpp"]
CUDA_SOURCES = ["fastavg_cuda.cu", "fastavg_cuda_ops.cpp"]
# Floating-point contraction is pinned off in every backend: a * b + c rounds the product and the sum
# separately, like the reference's torch ops, instead of fusing them where the instruction set has an FMA
# (the AVX2/AVX-512 variants of the CPU kernels; every GPU). -ffp-contract=off for the C++ compiler,
# --fmad=false for nvcc. No -std: torch's build adds the standard it was built with (C++20 for torch 2.13), and
# its headers warn under an older one. -g0 drops the debug information that Python's own CFLAGS ask for: it
# was most of the compile time and 20 MB of the extension.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]
# Cubins for the GPUs people rent: T4 (7.5), A100 (8.0; also runs on A10/L4/RTX 30xx/40xx, 8.6/8.9), H100 (9.0),
# and PTX of 9.0 that the driver compiles for anything newer (Blackwell).
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"
BUILD_CUDA_SETTINGS = ("0", "1", "auto")
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def build_cuda_setting() -> str:
    setting = os.environ.get("FASTAVG_BUILD_CUDA", "auto").lower()
    if setting not in BUILD_CUDA_SETTINGS:
        raise ValueError(f"FASTAVG_BUILD_CUDA must be 0, 1 or auto, got {setting!r}")
    return setting


def torch_version_define(torch_version: str) -> str:
    """The -D flag that stamps the extension with the torch it is built against (read back by
    :func:`fastavg._extension.built_against` without loading the library)."""
    return f"-DFASTAVG_TORCH_VERSION={torch_version}"


def _nvcc_reported_root(nvcc: str) -> str | None:
    """The toolkit root as nvcc itself reports it: nvcc may be a wrapper script outside the toolkit (so its
    own location says nothing), but its dry run names the real TOP."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _pip_toolkit_roots() -> list[str]:
    """Roots of a toolkit installed from pip's nvidia-cuda-nvcc / nvidia-cuda-runtime wheels (nvidia/cuXX)."""
    roots = []
    try:
        import nvidia  # a namespace package: present when any nvidia-* wheel is installed
    except ImportError:
        return roots
    for base in getattr(nvidia, "__path__", []):
        roots += sorted(glob.glob(os.path.join(base, "cu[0-9]*")), reverse=True)
        roots.append(os.path.join(base, "cuda_nvcc"))
    return roots


def cuda_toolkit_candidates() -> list[tuple[str, str]]:
    """(root, where it came from), in the order they are tried."""
    candidates = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append((os.environ[variable], f"${variable}"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        reported = _nvcc_reported_root(nvcc)
        if reported:
            candidates.append((reported, f"{nvcc} --dryrun"))
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on PATH ({nvcc})"))
    candidates.append((DEFAULT_CUDA_HOME, "the default location"))
    candidates += [(root, "pip's nvidia wheels") for root in _pip_toolkit_roots()]
    return candidates


def check_cuda_toolkit(root: str) -> str:
    """'' if `root` holds a usable toolkit (nvcc and the runtime headers), else what is missing."""
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return f"{root} has no include/cuda_runtime.h"
    if not os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
        return f"{root} has no bin/nvcc"
    return ""


def find_cuda_toolkit() -> tuple[str | None, str]:
    """The CUDA toolkit's root and '', or None and what was tried."""
    tried = []
    for root, source in cuda_toolkit_candidates():
        problem = check_cuda_toolkit(root)
        if not problem:
            return os.path.realpath(root), ""
        tried.append(f"{source}: {problem}")
    return None, ("no CUDA toolkit found (" + "; ".join(tried) + "); install the toolkit matching torch's CUDA, "
                  "or point CUDA_HOME at its root (the folder with bin/nvcc and include/cuda_runtime.h)")


def nvcc_version(root: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cudart_link_dir(root: str, scratch: str) -> str | None:
    """A folder to add to the linker's search path when the toolkit has libcudart.so.N but not the libcudart.so
    link that -lcudart looks for (pip's nvidia-cuda-runtime wheels ship it so); None when none is needed."""
    libs = [os.path.join(root, d) for d in ("lib64", "lib")]
    if any(os.path.exists(os.path.join(d, "libcudart.so")) for d in libs):
        return None
    versioned = sorted(p for d in libs for p in glob.glob(os.path.join(d, "libcudart.so.[0-9]*")))
    if not versioned:
        return None
    os.makedirs(scratch, exist_ok=True)
    link = os.path.join(scratch, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(versioned[0], link)
    return scratch


def cuda_plan(torch) -> tuple[str | None, str]:
    """Whether to build the CUDA kernels: (toolkit root, '') or (None, why not, with the fix)."""
    setting = build_cuda_setting()
    if setting == "0":
        return None, "FASTAVG_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return None, (f"this torch ({torch.__version__}) has no CUDA; install a CUDA build of torch for the CUDA "
                      "kernels (the Triton backend needs no build)")
    root, reason = find_cuda_toolkit()
    if root is None:
        return None, reason
    found = nvcc_version(root)
    wanted = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    if found is None:
        return None, f"{root}/bin/nvcc --version does not say which CUDA it is"
    if found[0] != wanted[0]:
        return None, (f"the CUDA toolkit at {root} is CUDA {found[0]}.{found[1]} but torch {torch.__version__} was "
                      f"built with CUDA {torch.version.cuda}; install toolkit {wanted[0]}.x (or point CUDA_HOME at "
                      "one), or a torch built for your toolkit")
    return root, ""


def use_cuda_toolkit(cpp_extension, root: str) -> None:
    """Points torch's extension builder at `root`: torch guesses the toolkit from the nvcc on PATH, which is
    wrong for a wrapper script (e.g. /usr/local/bin/nvcc gives /usr/local)."""
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
