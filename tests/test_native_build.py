"""Build tests of the native backend.

* every ``csrc/cuda/*.cu`` compiles stand-alone with the local nvcc for sm_90 (no torch headers,
  only ``-Icsrc -Icsrc/include``), and all of them link together into one shared library;
* the CUDA path of the bindings (``csrc/edfkern.cpp`` with ``EDFKERN_WITH_CUDA``) compiles against
  the installed torch's headers, even a CPU wheel's: only ``csrc/cuda/stream.cpp`` needs torch's CUDA
  headers, and nothing registers a ``torch.library`` namespace (``edfkern::`` is the one registered layer);
* ``import edfkern`` never builds anything, works with ``EDFKERN_NO_NATIVE=1`` and with a broken
  compiler environment, and then warns at most once while dispatch falls back to ``reference``.
"""
from __future__ import annotations

import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()


def test_cu_files_exist():
    names = {os.path.basename(f) for f in CU_FILES}
    assert {"dae.cu", "gradcam.cu", "cpd.cu", "covariance.cu", "features.cu"} <= names


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_includes_no_torch(path):
    src = open(path).read()
    bad = re.findall(r'#\s*include\s*[<"]((?:torch|ATen|c10)/[^>"]*)[>"]', src)
    assert not bad, f"{os.path.basename(path)} includes torch headers: {bad}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on this machine)")
def test_cu_compile_and_link_sm90(tmp_path):
    def compile_one(path):
        obj = tmp_path / (os.path.basename(path) + ".o")
        cmd = [NVCC, "-std=c++17", "-O2", "-Xcompiler", "-fPIC", f"-I{ROOT}/csrc", f"-I{ROOT}/csrc/include",
               "-gencode=arch=compute_90,code=sm_90", "-c", path, "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return path, obj, r

    with cf.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(compile_one, CU_FILES))
    failed = [(os.path.basename(p), r.stderr[-2000:]) for p, _, r in results if r.returncode != 0]
    assert not failed, f"nvcc failed: {failed}"
    lib = tmp_path / "libedfkern_cuda_kernels.so"
    r = subprocess.run([NVCC, "-shared", "-o", str(lib)] + [str(o) for _, o, _ in results], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"link failed: {r.stderr[-2000:]}"
    syms = subprocess.run(["nm", "-D", "-C", str(lib)], capture_output=True, text=True).stdout
    for launcher in ("edfkern::cuda::dae_apply", "edfkern::cuda::grad_cam", "edfkern::cuda::cpd_forward",
                     "edfkern::cuda::cov_forward", "edfkern::cuda::cc_backward"):
        assert launcher in syms, f"{launcher} missing from the linked library"


def _includes(path: str) -> list[str]:
    return re.findall(r'#\s*include\s*[<"]([^>"]*)[>"]', open(path).read())


CSRC_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True))


def test_only_stream_cpp_includes_torchs_cuda_headers():
    users = sorted(os.path.relpath(f, ROOT) for f in CSRC_FILES
                   if any(h.startswith(("c10/cuda/", "ATen/cuda/", "torch/cuda")) for h in _includes(f)))
    assert users == [os.path.join("csrc", "cuda", "stream.cpp")], users


def test_shared_headers_are_torch_free():
    """csrc/include/edfkern/*.h are included by the .cu files: no torch, ATen or c10 header there either."""
    for f in glob.glob(os.path.join(ROOT, "csrc", "include", "edfkern", "*.h")):
        bad = [h for h in _includes(f) if h.startswith(("torch/", "ATen/", "c10/"))]
        assert not bad, f"{os.path.basename(f)} includes {bad}"


def test_nothing_registers_a_torch_library_namespace():
    for f in CSRC_FILES:
        src = open(f).read()
        assert not re.search(r"\bTORCH_LIBRARY(_IMPL|_FRAGMENT)?\s*\(", src), f"{os.path.relpath(f, ROOT)} registers ops"


def test_sources_cover_every_translation_unit():
    from edfkern import build

    root = os.path.join(ROOT, "csrc")
    cpu = {os.path.relpath(p, root) for p in build.sources(root, with_cuda=False)}
    cuda = {os.path.relpath(p, root) for p in build.sources(root, with_cuda=True)}
    units = {os.path.relpath(f, root) for f in CSRC_FILES if f.endswith((".cpp", ".cu"))}
    assert cpu == {u for u in units if not u.startswith("cuda" + os.sep)} and "edfkern.cpp" in cpu
    assert cuda == units and os.path.join("cuda", "stream.cpp") in cuda


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++").split()[0]) is None, reason="no C++ compiler")
def test_cuda_path_of_the_bindings_compiles_without_torchs_cuda_headers():
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]
    cmd = [*os.environ.get("CXX", "c++").split(), "-std=c++20", "-fsyntax-only", "-DEDFKERN_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=edfkern_C", *incs, f"-I{ROOT}/csrc", f"-I{ROOT}/csrc/include",
           os.path.join(ROOT, "csrc", "edfkern.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("EDFKERN_NO_NATIVE", None)
    full.update(env)
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          cwd=ROOT, timeout=300)


FALLBACK_CHECK = """
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        import torch, edfkern
        from edfkern import _extension
        assert not _extension._STATE["done"], "import edfkern must not build or load the extension"
        info = edfkern.backends()["native"]
        info2 = edfkern.backends()["native"]
        x = torch.randn(6, 5)
        loss = edfkern.class_centralization_loss(x, groups=2)   # auto on CPU: falls back to reference
        edfkern.backends()
    ours = [w for w in rec if "edfkern" in str(w.message)]
    print("AVAILABLE", info["available"])
    print("REASON", info["reason"])
    print("WARNINGS", len(ours))
    print("LOSS", float(loss))
"""


def _parse(out: str) -> dict:
    return dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)


@pytest.fixture(scope="module")
def fallback_runs(tmp_path_factory):
    """The three fallback scenarios, each in its own fresh interpreter, run concurrently."""
    tmp = tmp_path_factory.mktemp("fallback")
    fake = tmp / "c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: error: refusing to compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    envs = {
        "no_native": dict(EDFKERN_NO_NATIVE="1"),
        "no_compiler": dict(CXX=str(tmp / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp / "ext1")),
        "failing_compiler": dict(CXX=str(fake), TORCH_EXTENSIONS_DIR=str(tmp / "ext2")),
    }
    with cf.ThreadPoolExecutor(max_workers=len(envs)) as ex:
        futs = {name: ex.submit(_run, FALLBACK_CHECK, **env) for name, env in envs.items()}
        return {name: f.result() for name, f in futs.items()}


def _result(runs, name) -> dict:
    r = runs[name]
    assert r.returncode == 0, r.stderr[-3000:]
    return _parse(r.stdout)


def test_import_with_no_native(fallback_runs):
    d = _result(fallback_runs, "no_native")
    assert d["AVAILABLE"] == "False"
    assert d["REASON"] == "EDFKERN_NO_NATIVE=1 set"
    assert int(d["WARNINGS"]) == 0  # an explicit opt-out is not worth a warning


def test_import_without_compiler(fallback_runs):
    d = _result(fallback_runs, "no_compiler")
    assert d["AVAILABLE"] == "False"
    assert d["REASON"].startswith("no C++ compiler"), d["REASON"]
    assert int(d["WARNINGS"]) == 1


def test_import_with_failing_compiler(fallback_runs):
    d = _result(fallback_runs, "failing_compiler")
    assert d["AVAILABLE"] == "False"
    assert d["REASON"].startswith("build failed"), d["REASON"]
    assert int(d["WARNINGS"]) == 1


def test_setup_py_pure_python_has_no_torch_import():
    """The default install path must not need torch in the build environment."""
    src = open(os.path.join(ROOT, "setup.py")).read()
    head = src.split('if os.environ.get("EDFKERN_BUILD_EXT"')[0]
    assert "import torch" not in head and "edfkern_build" not in head.split("spec_from_file_location")[0]
