"""Backend selection (docs/design.md): registry, auto choice, use_backend, set_backend, EDFKERN_BACKEND."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import edfkern
from edfkern import _dispatch


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
        # auto skips it silently and lands on a working backend
        assert _dispatch.kernel("cov_forward", torch.device("cpu")) is not None
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


def test_auto_on_cpu_prefers_native_then_reference():
    rep = edfkern.backends()
    fn = _dispatch.kernel("cov_forward", torch.device("cpu"))
    expected = "native" if rep.get("native", {}).get("available") else "reference"
    assert fn.__module__.startswith(f"edfkern.{expected}") or fn.__module__.startswith("edfkern._C")


def test_backends_give_the_same_answer():
    x = torch.randn(12, 5, 6)
    results = {}
    for name, info in edfkern.backends().items():
        if info["available"] and "cpu" in info["devices"]:
            with edfkern.use_backend(name):
                results[name] = edfkern.local_covariance(x, groups=3)
    ref = results.pop("reference")
    for name, r in results.items():
        torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_info_cli_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "edfkern.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "triton" in out and "cuda" in out
    for name in edfkern.backends():
        assert name in out
