"""Builds fastavg._C: the C++ CPU kernels always, the CUDA kernels too when torch has CUDA and a toolkit is found.

FASTAVG_BUILD_CUDA=0|1|auto (default auto). With auto, a CUDA part that cannot be built (no toolkit, a CUDA
version other than torch's, a compile error) leaves the CPU kernels built and says why; with 1 it fails the
install. Without torch or a compiler at build time (pip's build isolation hides an installed torch) it installs
pure Python and says so: fastavg then compiles the same sources just in time on first use (fastavg/_extension.py),
from the copy of csrc/ that this build puts into the package. How to build (sources, flags, where the toolkit is)
lives in fastavg/_build.py, shared with that just-in-time build. A rebuild first deletes the extension it
replaces, so that a failed one cannot leave a stale library behind to be imported.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # By path: importing the fastavg package would import torch, which may not be there.
    spec = importlib.util.spec_from_file_location("fastavg_build", os.path.join(HERE, "fastavg", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config = _load_build_config()


def _say(message):
    print(f"fastavg: {message}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the package (fastavg/csrc): the sources of the just-in-time build."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastavg", "csrc")
        os.makedirs(target, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
            if path.endswith((".h", ".inc", ".cpp", ".cu")):
                self.copy_file(path, os.path.join(target, os.path.basename(path)))


def _remove_built_extensions(build_lib, inplace):
    folders = [os.path.join(build_lib, "fastavg")] + ([os.path.join(HERE, "fastavg")] if inplace else [])
    for folder in folders:
        for path in glob.glob(os.path.join(folder, "_C.*")):
            if path.endswith((".so", ".pyd")):
                os.remove(path)


def _extensions_and_builder():
    try:
        setting = config.build_cuda_setting()
    except ValueError as error:
        raise SystemExit(str(error)) from None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as error:  # noqa: BLE001 - any failure to import torch means: no extension
        _say(f"torch is not importable at build time ({error}); installing pure Python: fastavg will compile its "
             "kernels on first use. To build them now: pip install torch setuptools ninja, then "
             "pip install --no-build-isolation")
        return [], build_ext

    cxx_flags = config.CXX_FLAGS + [config.torch_version_define(torch.__version__)]
    sources = [os.path.join("csrc", s) for s in config.CPU_SOURCES]
    cpu_extension = cpp_extension.CppExtension("fastavg._C", sources, extra_compile_args={"cxx": cxx_flags},
                                               extra_link_args=config.LINK_FLAGS)
    cuda_root, cuda_reason = config.cuda_plan(torch)
    if cuda_root is None:
        if setting == "1":
            raise SystemExit(f"FASTAVG_BUILD_CUDA=1, but the CUDA kernels cannot be built: {cuda_reason}")
        _say(f"building the CPU kernels without the CUDA ones: {cuda_reason}")
        extension = cpu_extension
    else:
        config.use_cuda_toolkit(cpp_extension, cuda_root)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", config.DEFAULT_CUDA_ARCH_LIST)
        link_args = list(config.LINK_FLAGS)
        link_dir = config.cudart_link_dir(cuda_root, os.path.join(HERE, "build", "cudart"))
        if link_dir:
            link_args.append(f"-L{link_dir}")
        _say(f"building the CPU and CUDA kernels (toolkit {cuda_root}, TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']})")
        extension = cpp_extension.CUDAExtension(
            "fastavg._C", sources + [os.path.join("csrc", s) for s in config.CUDA_SOURCES],
            extra_compile_args={"cxx": cxx_flags, "nvcc": config.NVCC_FLAGS}, extra_link_args=link_args)

    class BuildExtension(cpp_extension.BuildExtension):
        """Builds fastavg._C; a failed CUDA part falls back to the CPU kernels, a failed build to pure Python."""

        def run(self):
            _remove_built_extensions(self.build_lib, self.inplace or self.editable_mode)
            if self.editable_mode:
                # pip's editable builds compile in a fresh temporary folder each time; a folder of the checkout
                # lets ninja keep the objects, so reinstalling (`pip install -e ".[test]"`) only links again.
                self.build_temp = os.path.join(HERE, "build", f"editable-{sys.implementation.cache_tag}")
            try:
                super().run()
            except SystemExit:
                raise
            except Exception as error:  # noqa: BLE001 - a missing compiler surfaces as many error types
                _say(f"could not build the C++ extension ({error}); installing pure Python: fastavg will try to "
                     "compile its kernels on first use and say why if it cannot")

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001
                if self.extensions[0] is cpu_extension:
                    raise
                if setting == "1":
                    raise SystemExit(f"FASTAVG_BUILD_CUDA=1, and the CUDA kernels failed to build: {error}") from None
                _say(f"the CUDA kernels failed to build ({error}); building the CPU kernels alone. The CUDA "
                     "backend is unavailable until this is fixed; FASTAVG_BUILD_CUDA=1 makes it an install error")
                self.extensions = [cpu_extension]
                super().build_extensions()

    return [extension], BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())


extensions, builder = _extensions_and_builder()
setup(ext_modules=extensions, cmdclass={"build_ext": builder, "build_py": BuildPyWithSources})
