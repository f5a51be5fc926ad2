"""Finds fastavg's compiled extension, or compiles it just in time.

The extension is normally built at install (setup.py) as ``fastavg._C``. When that did not happen (pip's
build isolation hid torch, the wheel was built without torch or a compiler) or the installed one was built
against another torch, fastavg compiles the same sources, shipped inside the package, with
``torch.utils.cpp_extension.load`` and ninja into a cache folder per fastavg version, torch version and
source hash (DeepSpeed's op builders do the same), and says so in one line. An installed extension built
against another torch is never loaded: loading it would register the ops, and its C++ ABI may not match.

``FASTAVG_JIT=0`` turns the just-in-time build off; ``FASTAVG_CACHE_DIR`` moves the cache (default
``$XDG_CACHE_HOME/fastavg`` or ``~/.cache/fastavg``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import shutil
import sys
import sysconfig
from types import ModuleType

import torch

from . import _build

STAMP = b"fastavg-built-against-torch:"
JIT_NAME = "fastavg_jit"


def sources_dir() -> str | None:
    """The C++/CUDA sources: inside the installed package (fastavg/csrc, copied there by setup.py), or the
    repository's csrc/ next to the package for a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if all(os.path.isfile(os.path.join(candidate, s)) for s in _build.CPU_SOURCES):
            return candidate
    return None


def built_against(path: str) -> str | None:
    """The torch version a compiled extension was built against, read from the file without loading it."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(STAMP)
            if start < 0:
                return None
            end = data.find(b"\n", start)
            return data[start + len(STAMP):end].decode("ascii", "replace")
    except (OSError, ValueError):
        return None


def cache_root() -> str:
    if os.environ.get("FASTAVG_CACHE_DIR"):
        return os.environ["FASTAVG_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastavg")


def _source_hash(directory: str, files: list[str], flags: list[str]) -> str:
    """Of the sources compiled and every header they may include, and the flags."""
    digest = hashlib.sha256("\0".join(flags + files).encode())
    headers = [n for n in sorted(os.listdir(directory)) if n.endswith((".h", ".inc"))]
    for name in headers + files:
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


class Unavailable(Exception):
    """The extension cannot be had here; the message says why and how to fix it."""


def _installed() -> tuple[ModuleType | None, str]:
    """fastavg._C if it is installed and built against this torch, else (None, why not)."""
    spec = importlib.util.find_spec("fastavg._C")
    if spec is None or spec.origin is None:
        return None, ("fastavg was installed without its compiled extension (pip's build isolation hides torch "
                      "from the build, or the wheel was built without torch or a C++ compiler)")
    against = built_against(spec.origin)
    if against != torch.__version__:
        return None, (f"the installed extension {spec.origin} was built against torch {against or 'unknown'}, "
                      f"this is torch {torch.__version__}")
    try:
        from . import _C
    except ImportError as error:
        return None, f"the installed extension {spec.origin} does not load ({error})"
    return _C, ""


def _jit_blocker() -> str:
    """'' if a just-in-time build can be tried, else why not and the fix."""
    if os.environ.get("FASTAVG_JIT", "1") == "0":
        return "FASTAVG_JIT=0 turns the just-in-time build off; unset it to compile the kernels on first use"
    if sources_dir() is None:
        return "the C++ sources are not in the installed package; reinstall fastavg"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler to build them with ({compiler!r} is not on PATH; torch compiles with $CXX or c++): "
                "install one (Debian/Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++; conda: conda install "
                "-c conda-forge gxx) or set CXX")
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "ninja is missing (torch compiles extensions with it): pip install ninja"
    return ""


def _compile(why: str, cuda_root: str | None) -> ModuleType:
    """Builds the CPU kernels, plus the CUDA ones when `cuda_root` names a toolkit, into the cache."""
    from torch.utils import cpp_extension

    directory = sources_dir()
    files = _build.CPU_SOURCES + (_build.CUDA_SOURCES if cuda_root else [])
    cflags = _build.CXX_FLAGS + [_build.torch_version_define(torch.__version__)]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}"
    build_dir = os.path.join(cache_root(), f"{_fastavg_version()}-torch{torch.__version__}-{tag}-"
                             f"{'cuda' if cuda_root else 'cpu'}-{_source_hash(directory, files, cflags)}")
    os.makedirs(build_dir, exist_ok=True)
    if not any(n.startswith(JIT_NAME) and n.endswith((".so", ".pyd")) for n in os.listdir(build_dir)):
        print(f"fastavg: compiling the C++ {'and CUDA ' if cuda_root else ''}kernels for torch {torch.__version__} "
              f"into {build_dir} (once per torch version; minutes): {why}", file=sys.stderr, flush=True)
    ldflags = list(_build.LINK_FLAGS)
    cuda_kwargs = {}
    if cuda_root:
        _build.use_cuda_toolkit(cpp_extension, cuda_root)
        # Without TORCH_CUDA_ARCH_LIST torch compiles for the GPUs it sees, the fastest build for this machine.
        cuda_kwargs = {"with_cuda": True, "extra_cuda_cflags": _build.NVCC_FLAGS}
        link_dir = _build.cudart_link_dir(cuda_root, os.path.join(build_dir, "cudart"))
        if link_dir:
            ldflags.append(f"-L{link_dir}")
    try:
        return cpp_extension.load(name=JIT_NAME, sources=[os.path.join(directory, s) for s in files],
                                  extra_cflags=cflags, extra_ldflags=ldflags, build_directory=build_dir,
                                  verbose=False, **cuda_kwargs)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError or subprocess errors with the log
        log = os.path.join(build_dir, "error.log")
        with open(log, "w") as f:
            f.write(str(error))
        raise Unavailable(f"compiling the kernels in {build_dir} failed; the compiler's output is in {log}") from error


def _fastavg_version() -> str:
    from . import __version__
    return __version__


def load() -> tuple[ModuleType | None, str, str]:
    """(the extension module, '', where it came from) or (None, why it is unavailable and the fix, '')."""
    module, why = _installed()
    if module is not None:
        return module, "", f"installed with fastavg ({module.__file__})"
    blocker = _jit_blocker()
    if blocker:
        return None, f"{why}; cannot compile it just in time: {blocker}", ""
    # The CUDA kernels are compiled just in time only for a GPU that is there to run them.
    cuda_root = _build.cuda_plan(torch)[0] if torch.cuda.is_available() else None
    try:
        module = _compile(why, cuda_root)
    except Unavailable as error:
        if cuda_root is None:
            return None, f"{why}; {error}", ""
        print(f"fastavg: the CUDA kernels did not compile ({error}); compiling the CPU kernels alone",
              file=sys.stderr, flush=True)
        try:
            module = _compile(why, None)
        except Unavailable as cpu_error:
            return None, f"{why}; {cpu_error}", ""
    return module, "", f"compiled just in time ({module.__file__}) because {why}"
