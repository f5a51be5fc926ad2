"""Builds fastavg._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

FASTAVG_BUILD_CUDA=0|1|auto (default auto). The install never fails for want of a compiler or of torch at
build time: it then installs pure Python (the reference backend) and says why.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CPU_SOURCES = ["csrc/fastavg_ops.cpp", "csrc/fastavg_cpu.cpp", "csrc/fastavg_eager.cpp"]
CUDA_SOURCES = ["csrc/fastavg_cuda.cu", "csrc/fastavg_cuda_ops.cpp"]
# Floating-point contraction is pinned off in every backend: a * b + c rounds the product and the sum
# separately, like the reference's torch ops, instead of fusing them where the instruction set has an FMA
# (the AVX2/AVX-512 variants of the CPU kernels; every GPU). -ffp-contract=off for the C++ compiler,
# --fmad=false for nvcc.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]


def _say(message):
    print(f"fastavg: {message}", file=sys.stderr)


def _want_cuda(torch, cpp_extension):
    setting = os.environ.get("FASTAVG_BUILD_CUDA", "auto").lower()
    if setting not in ("0", "1", "auto"):
        raise SystemExit(f"FASTAVG_BUILD_CUDA must be 0, 1 or auto, got {setting!r}")
    reasons = []
    if torch.version.cuda is None:
        reasons.append("this torch build has no CUDA")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit (nvcc) was found")
    if not all(os.path.exists(s) for s in CUDA_SOURCES):
        reasons.append("the CUDA sources are not in this tree")
    if setting == "1" and reasons:
        raise SystemExit("FASTAVG_BUILD_CUDA=1 but " + "; ".join(reasons))
    if setting == "0" or reasons:
        _say("building without CUDA kernels (" + ("FASTAVG_BUILD_CUDA=0" if setting == "0" else "; ".join(reasons)) + ")")
        return False
    return True


def _extension_and_builder():
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as error:  # noqa: BLE001 - any failure to import torch means: no extension
        _say(f"torch is not importable at build time ({error}); installing pure Python (reference backend only)")
        return [], build_ext
    if _want_cuda(torch, cpp_extension):
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        extension = cpp_extension.CUDAExtension(
            "fastavg._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("FASTAVG_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "fastavg._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]
        )

    class BuildOrSkip(cpp_extension.BuildExtension):
        """Builds the extension; if compiling fails, installs pure Python and says why."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - a missing compiler surfaces as many error types
                _say(f"could not build the C++ extension ({error}); installing pure Python (reference backend only)")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                _say(f"could not build {ext.name} ({error}); installing pure Python (reference backend only)")

    return [extension], BuildOrSkip.with_options(use_ninja=_has_ninja())


def _has_ninja():
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


extensions, builder = _extension_and_builder()
setup(ext_modules=extensions, cmdclass={"build_ext": builder})
