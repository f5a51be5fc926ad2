"""How fastavg gets its compiled extension: the CUDA toolkit search and plan of setup.py (fastavg/_build.py), the
loader that refuses an extension built against another torch and compiles one just in time (fastavg/_extension.py),
the warning when neither is possible, and what the sdist and the wheel carry.

The just-in-time build itself takes minutes: test_jit_build_compiles_and_steps runs when FASTAVG_SLOW_TESTS=1
(.ci/sdist.sh runs it from an sdist installed with pip's defaults).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from types import SimpleNamespace

import pytest
import torch

from fastavg import _build, _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_toolkit(tmp_path, release="13.0"):
    """A toolkit folder whose nvcc answers --version and --dryrun, and a wrapper script in another folder that
    execs it (as /usr/local/bin/nvcc does for many installs)."""
    root = tmp_path / "cuda"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$1" in
          --version) echo "Cuda compilation tools, release {release}, V{release}.1";;
          --dryrun) echo "#\\$ TOP={root}/bin/.." >&2;;
        esac
        """))
    nvcc.chmod(0o755)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    (wrappers / "nvcc").chmod(0o755)
    return root, wrappers


@pytest.fixture
def no_toolkit_env(monkeypatch):
    for variable in ("CUDA_HOME", "CUDA_PATH", "FASTAVG_BUILD_CUDA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(_build, "_pip_toolkit_roots", lambda: [])
    monkeypatch.setattr(_build, "DEFAULT_CUDA_HOME", "/nonexistent/cuda")


def test_toolkit_behind_a_wrapper_is_found_where_nvcc_says(tmp_path, monkeypatch, no_toolkit_env):
    root, wrappers = _fake_toolkit(tmp_path)
    monkeypatch.setenv("PATH", f"{wrappers}:/usr/bin:/bin")
    # torch's own guess is the wrapper's grandparent, which has no headers.
    assert _build.check_cuda_toolkit(str(tmp_path)) == f"{tmp_path} has no include/cuda_runtime.h"
    assert _build.find_cuda_toolkit() == (str(root.resolve()), "")


def test_no_toolkit_says_what_was_tried(tmp_path, monkeypatch, no_toolkit_env):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    root, reason = _build.find_cuda_toolkit()
    assert root is None
    assert f"$CUDA_HOME: {tmp_path / 'nowhere'} has no include/cuda_runtime.h" in reason
    assert "point CUDA_HOME at its root" in reason


def _torch_like(version, cuda):
    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda))


def test_cuda_plan(tmp_path, monkeypatch, no_toolkit_env):
    root, wrappers = _fake_toolkit(tmp_path, release="12.8")
    monkeypatch.setenv("PATH", f"{wrappers}:/usr/bin:/bin")
    assert _build.cuda_plan(_torch_like("2.13.0+cu128", "12.8")) == (str(root.resolve()), "")
    _, reason = _build.cuda_plan(_torch_like("2.13.0+cu130", "13.0"))
    assert "is CUDA 12.8 but torch 2.13.0+cu130 was built with CUDA 13.0" in reason
    _, reason = _build.cuda_plan(_torch_like("2.13.0+cpu", None))
    assert "has no CUDA" in reason
    monkeypatch.setenv("FASTAVG_BUILD_CUDA", "0")
    assert _build.cuda_plan(_torch_like("2.13.0+cu128", "12.8")) == (None, "FASTAVG_BUILD_CUDA=0")
    monkeypatch.setenv("FASTAVG_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="FASTAVG_BUILD_CUDA must be 0, 1 or auto, got 'yes'"):
        _build.cuda_plan(_torch_like("2.13.0+cu128", "12.8"))


def test_cudart_link_for_a_pip_toolkit(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libcudart.so.13").write_text("")
    link_dir = _build.cudart_link_dir(str(tmp_path), str(tmp_path / "scratch"))
    assert os.readlink(os.path.join(link_dir, "libcudart.so")) == str(tmp_path / "lib" / "libcudart.so.13")
    (tmp_path / "lib" / "libcudart.so").symlink_to("libcudart.so.13")
    assert _build.cudart_link_dir(str(tmp_path), str(tmp_path / "scratch")) is None


def test_stamp_is_read_without_loading(tmp_path):
    library = tmp_path / "lib.so"
    library.write_bytes(b"\0ELF..." + _extension.STAMP + b"2.13.0+cpu\n\0more")
    assert _extension.built_against(str(library)) == "2.13.0+cpu"
    library.write_bytes(b"no stamp")
    assert _extension.built_against(str(library)) is None


def test_installed_extension_is_stamped_with_this_torch():
    spec = importlib.util.find_spec("fastavg._C")  # found, not loaded: no just-in-time build either
    if spec is None:
        pytest.skip("fastavg is installed without its compiled extension")
    assert _extension.built_against(spec.origin) == torch.__version__


def _run(*parts, **env):
    """Runs the script made of `parts` (each dedented) in a fresh interpreter."""
    script = "".join(textwrap.dedent(part) for part in parts)
    environment = {**os.environ, **env}
    # Not from the checkout's root: `python -c` puts the working directory first on sys.path.
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environment, cwd=tempfile.gettempdir())


def test_extension_built_against_another_torch_is_not_loaded():
    out = _run("""
        import importlib.machinery, importlib.util, sys, fastavg, fastavg._extension as e
        # An installed extension (real or not: the sdist's pure-Python install has none) stamped with torch 1.0.0.
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *args: (importlib.machinery.ModuleSpec(name, None, origin="/x/_C.so")
                                                        if name == "fastavg._C" else find_spec(name, *args))
        e.built_against = lambda path: "1.0.0"
        reason = fastavg.backend_status()["cpu"]
        assert "fastavg._C" not in sys.modules
        print(reason)
    """, FASTAVG_JIT="0")
    assert out.returncode == 0, out.stderr
    assert f"/x/_C.so was built against torch 1.0.0, this is torch {torch.__version__}" in out.stdout
    assert "FASTAVG_JIT=0 turns the just-in-time build off; unset it" in out.stdout


NO_EXTENSION = """
    import warnings, torch, fastavg, fastavg._extension as e
    e._installed = lambda: (None, "no extension for the test")
"""


def test_without_a_compiler_the_optimizer_warns_once_with_the_fix():
    out = _run(NO_EXTENSION, """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                p = torch.nn.Parameter(torch.ones(3))
                opt = fastavg.AdamW([p], average=fastavg.EMA(0.9))
                assert opt.backends() == ["reference"]
                p.grad = torch.ones(3)
                opt.step()
            fastavg.AdamW([torch.nn.Parameter(torch.ones(3))], backend="reference")
        assert len(caught) == 1, [str(w.message) for w in caught]
        print(caught[0].message)
    """, CXX="/nonexistent/c++")
    assert out.returncode == 0, out.stderr
    message = out.stdout
    assert "fastavg runs the slow reference backend" in message
    assert "no extension for the test" in message
    assert "'/nonexistent/c++' is not on PATH" in message and "apt-get install g++" in message
    assert "backend='reference'" in message


def test_cli_reports_the_reason_and_fix():
    out = _run(NO_EXTENSION, """
        import fastavg.__main__
        fastavg.__main__.main([])
    """, FASTAVG_JIT="0")
    assert out.returncode == 0, out.stderr
    cpu = next(line for line in out.stdout.splitlines() if line.strip().startswith("cpu"))
    assert "unavailable: no extension for the test; cannot compile it just in time: FASTAVG_JIT=0" in cpu
    help_text = subprocess.run([sys.executable, "-m", "fastavg", "--help"], capture_output=True, text=True,
                               check=True, cwd=tempfile.gettempdir()).stdout
    assert "FASTAVG_JIT=0" in help_text and "--no-build-isolation" in help_text


def test_sdist_carries_tests_benchmarks_license_and_sources(tmp_path):
    # egg_info --egg-base keeps the checkout clean.
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "FASTAVG_BUILD_CUDA": "0"})
    (sdist,) = tmp_path.glob("fastavg-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    tracked = subprocess.run(["git", "ls-files", "tests", "benchmarks", "csrc"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    expected = set(tracked) or {"tests/helpers.py", "tests/conftest.py", "benchmarks/quality/digits.py"}
    assert expected <= names, sorted(expected - names)
    assert {"LICENSE", "tests/helpers.py", "tests/conftest.py", "tests/test_build.py", "csrc/fastavg_cpu.cpp",
            ".ci/triton_aot.py"} <= names
    assert not any(name.endswith((".so", ".pyc")) for name in names)
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info


def _tree_copy(tmp_path):
    """The files setup.py needs, copied, so that a build can fail without touching the checkout."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "csrc", "fastavg"):
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy(source, tree / name)
    return tree


def test_failed_rebuild_leaves_no_stale_extension(tmp_path):
    tree = _tree_copy(tmp_path)
    stale = tree / "fastavg" / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.write_text("an extension from an earlier build")
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, capture_output=True,
                         text=True, env={**os.environ, "CXX": "false", "FASTAVG_BUILD_CUDA": "0"})
    assert out.returncode == 0, out.stderr
    assert "could not build the C++ extension" in out.stderr and "compile its kernels on first use" in out.stderr
    assert not stale.exists()


def test_build_cuda_1_fails_the_install_with_the_reason(tmp_path):
    tree = _tree_copy(tmp_path)
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, capture_output=True,
                         text=True, env={**os.environ, "FASTAVG_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent"})
    assert out.returncode != 0
    if torch.version.cuda is None:
        assert "FASTAVG_BUILD_CUDA=1, but the CUDA kernels cannot be built: this torch" in out.stderr
    else:
        assert "FASTAVG_BUILD_CUDA=1" in out.stderr


def test_wheel_build_ships_the_sources_for_the_jit(tmp_path):
    tree = _tree_copy(tmp_path)
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")], cwd=tree,
                   check=True, capture_output=True, env={**os.environ, "FASTAVG_BUILD_CUDA": "0"})
    shipped = sorted(p.name for p in (tmp_path / "lib" / "fastavg" / "csrc").iterdir())
    assert set(_build.CPU_SOURCES + _build.CUDA_SOURCES) <= set(shipped)
    assert "fastavg_cpu_kernel.inc" in shipped and "fastavg_rules.h" in shipped


@pytest.mark.skipif(os.environ.get("FASTAVG_SLOW_TESTS") != "1", reason="compiles for minutes; FASTAVG_SLOW_TESTS=1")
def test_jit_build_compiles_and_steps(tmp_path):
    # FASTAVG_JIT_TEST_CACHE: a cold cache folder that the caller reuses afterwards (.ci/sdist.sh).
    cache = os.environ.get("FASTAVG_JIT_TEST_CACHE") or str(tmp_path)
    script = textwrap.dedent(NO_EXTENSION) + textwrap.dedent("""
        from fastavg import reference
        params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(3)]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = fastavg.AdamW(params, lr=0.1, average=fastavg.EMA(0.9))
        ref = reference.AdamW(twins, lr=0.1, average=fastavg.EMA(0.9))
        assert opt.backends() == ["cpu"], fastavg.backend_status()
        for _ in range(3):
            for p, q in zip(params, twins):
                p.grad = torch.ones_like(p); q.grad = torch.ones_like(q)
            opt.step(); ref.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q)
        print(fastavg._backends.extension_origin())
    """)
    first = _run(script, FASTAVG_CACHE_DIR=cache)
    assert first.returncode == 0, first.stderr
    assert f"fastavg: compiling the C++ kernels for torch {torch.__version__} into {cache}" in first.stderr
    assert first.stdout.startswith(f"compiled just in time ({cache}")
    second = _run(script, FASTAVG_CACHE_DIR=cache)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr
