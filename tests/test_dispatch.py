"""Backend selection (docs/design.md): registry, auto choice, use_backend, set_backend, EDFKERN_BACKEND."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import edfkern
from edfkern import _dispatch
from tests.opinfo import OPS


def test_backends_report_every_backend_with_a_reason():
    rep = edfkern.backends()
    assert "reference" in rep and rep["reference"]["available"]
    for name, info in rep.items():
        assert set(info) == {"available", "reason", "devices", "description"}
        assert isinstance(info["reason"], str) and info["reason"]
        if not info["available"]:
            assert info["reason"] != "ok"


def test_use_backend_nests_and_restores():
    assert edfkern.current_backend() in ("auto", os.environ.get("EDFKERN_BACKEND", "auto"))
    outer = edfkern.current_backend()
    with edfkern.use_backend("reference"):
        assert edfkern.current_backend() == "reference"
        with edfkern.use_backend("auto"):
            assert edfkern.current_backend() == "auto"
        assert edfkern.current_backend() == "reference"
    assert edfkern.current_backend() == outer


def test_set_backend_and_env(monkeypatch):
    monkeypatch.setattr(_dispatch, "_GLOBAL", None)
    monkeypatch.setenv("EDFKERN_BACKEND", "reference")
    assert edfkern.current_backend() == "reference"
    edfkern.set_backend("auto")
    assert edfkern.current_backend() == "auto"  # set_backend beats the environment
    monkeypatch.setattr(_dispatch, "_GLOBAL", None)
    monkeypatch.setenv("EDFKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        edfkern.current_backend()


def test_unknown_and_unavailable_backends_raise(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        edfkern.set_backend("cuda-magic")
    with pytest.raises(TypeError):
        edfkern.use_backend(3).__enter__()
    _dispatch.register_backend("broken_for_test", "edfkern.reference", probe=lambda: "not built: test says so",
                               devices=lambda: frozenset({"cpu"}), description="test")
    try:
        with pytest.raises(RuntimeError, match="not built: test says so"):
            edfkern.set_backend("broken_for_test")
        with pytest.raises(RuntimeError, match="not built: test says so"):
            with edfkern.use_backend("broken_for_test"):
                pass
        # auto skips it silently and lands on a working backend: the kernel is that backend's own function
        choice = _dispatch.auto_backend("cov_forward", "cpu")
        assert choice in ("native", "reference")
        assert _dispatch.kernel("cov_forward", torch.device("cpu")).__wrapped__ is _backend_fn(choice, "cov_forward")
    finally:
        del _dispatch._BACKENDS["broken_for_test"]


def test_explicit_backend_refuses_wrong_device():
    _dispatch.register_backend("gpu_only_for_test", "edfkern.reference", probe=lambda: None,
                               devices=lambda: frozenset({"cuda"}), description="test")
    try:
        with edfkern.use_backend("gpu_only_for_test"):
            with pytest.raises(RuntimeError, match="cannot take cpu tensors"):
                edfkern.local_covariance(torch.randn(4, 3, 2), groups=2)
    finally:
        del _dispatch._BACKENDS["gpu_only_for_test"]


def test_probe_exceptions_are_reported_not_raised():
    def boom():
        raise OSError("compiler exploded")

    _dispatch.register_backend("boom_for_test", "edfkern.reference", probe=boom, devices=lambda: frozenset({"cpu"}),
                               description="test")
    try:
        info = edfkern.backends()["boom_for_test"]
        assert not info["available"] and "compiler exploded" in info["reason"]
    finally:
        del _dispatch._BACKENDS["boom_for_test"]


def _backend_fn(backend: str, op: str):
    """The function ``op`` of backend module ``backend`` as it stands now (a spy, once patched)."""
    return getattr(importlib.import_module(_dispatch._BACKENDS[backend].module), op)


def test_auto_on_cpu_prefers_native_then_reference():
    rep = edfkern.backends()
    expected = "native" if rep.get("native", {}).get("available") else "reference"
    assert _dispatch.auto_backend("cov_forward", "cpu") == expected
    with edfkern.use_backend("auto"):
        fn = _dispatch.kernel("cov_forward", torch.device("cpu"))
    assert fn.__wrapped__ is _backend_fn(expected, "cov_forward")


def _cpu_backends() -> list[str]:
    return [n for n, i in edfkern.backends().items() if i["available"] and "cpu" in i["devices"]]


@pytest.mark.parametrize("selection", ["auto", "reference", "native", "triton"])
def test_public_ops_run_the_selected_backends_kernels(monkeypatch, selection):
    """Spy on every kernel of every CPU backend: each public op's table sample (tests/opinfo.py), forward and
    backward, calls exactly the selected backend's kernels (auto on CPU: native when it is built, else
    reference), and exactly the kernels its table entry lists; together they reach every contract kernel."""
    import edfkern.reference as R

    avail = _cpu_backends()
    if selection != "auto" and selection not in avail:
        pytest.skip(f"{selection} cannot run on CPU tensors here")
    expected = _dispatch.auto_backend("cov_forward", "cpu") if selection == "auto" else selection
    calls: dict[str, list[str]] = {b: [] for b in avail}
    for b in avail:
        mod = importlib.import_module(_dispatch._BACKENDS[b].module)
        for op in R.__all__:
            def spy(*args, _raw=getattr(mod, op), _log=calls[b], _op=op):
                _log.append(_op)
                return _raw(*args)
            monkeypatch.setattr(mod, op, spy)
    monkeypatch.setattr(_dispatch, "_WRAPPED", {})  # forget the kernels looked up before the spies
    g = torch.Generator().manual_seed(0)
    with edfkern.use_backend(selection):
        for op in OPS:
            if op.sample is None:
                continue
            before = len(calls[expected])
            op.sample(g)
            assert set(calls[expected][before:]) == set(op.kernels), (
                f"{op.name} called {sorted(set(calls[expected][before:]))}, its table entry lists {op.kernels}")
    assert set(calls[expected]) == set(R.__all__), f"{expected} kernels never called: " \
        f"{sorted(set(R.__all__) - set(calls[expected]))}"
    others = {b: c for b, c in calls.items() if b != expected and c}
    assert not others, f"selected {selection!r} ({expected}) but other backends ran: {others}"


def test_backends_give_the_same_answer():
    x = torch.randn(12, 5, 6)
    results = {}
    for name in _cpu_backends():
        with edfkern.use_backend(name):
            results[name] = edfkern.local_covariance(x, groups=3)
    ref = results.pop("reference")
    if not results:
        pytest.skip("only the reference backend runs on CPU tensors here: nothing to compare it with")
    for name, r in results.items():
        torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_info_cli_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "edfkern.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "triton" in out and "cuda" in out
    for name in edfkern.backends():
        assert name in out
