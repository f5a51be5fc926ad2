"""``python -m fastavg``: which backends are available here, and why the others are not and how to fix that."""
import argparse

import torch

from . import __version__, _backends

DESCRIPTION = """Reports fastavg's backends: reference (pure torch, always there), cpu (the compiled C++ kernels),
cuda (the compiled CUDA kernels) and triton (Triton kernels, on CUDA tensors). For each one that is
unavailable it prints the reason and the fix. The compiled extension is normally built at install
(pip install --no-build-isolation, with torch, setuptools and ninja installed first); when the install has
none, or one built against another torch, fastavg compiles it on first use into a cache folder, and this
command does that too (FASTAVG_JIT=0 turns it off; FASTAVG_CACHE_DIR moves the cache). The optimizers pick
with backend="auto" (or FASTAVG_BACKEND): triton, else cuda, else reference on CUDA tensors; cpu, else
reference on CPU tensors."""


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m fastavg", description=DESCRIPTION).parse_args(argv)
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", no CUDA"
    print(f"fastavg {__version__}, torch {torch.__version__}{cuda}")
    status = _backends.status()
    for name, reason in status.items():
        print(f"  {name:<10} {'available' if not reason else 'unavailable: ' + reason}")
    origin = _backends.extension_origin()
    if origin:
        print(f"compiled extension: {origin}")


if __name__ == "__main__":
    main()
