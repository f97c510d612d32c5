"""Shared fixtures: every op test runs once per available backend.

Without a GPU, Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``; the
variable must be set before Triton JIT-decorates anything, so it is set here,
before edfkern is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import edfkern  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends() -> list[str]:
    return [name for name, info in edfkern.backends().items() if info["available"] and DEVICE in info["devices"]]


def all_backend_params():
    """Every registered backend; unavailable ones are skipped with the reason the registry gives."""
    params = []
    for name, info in edfkern.backends().items():
        ok = info["available"] and DEVICE in info["devices"]
        reason = info["reason"] if not info["available"] else f"cannot take {DEVICE} tensors"
        params.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {reason}")))
    return params


@pytest.fixture(params=all_backend_params())
def backend(request):
    """Run the test body under ``edfkern.use_backend(name)``; yields the name."""
    with edfkern.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not "gpu" in keywords: a folder named gpu would match
            item.add_marker(skip)


def pytest_sessionstart(session):
    """CI sets EDFKERN_REQUIRE_BACKENDS so a backend that fails to build fails the run instead of skipping."""
    required = [b for b in os.environ.get("EDFKERN_REQUIRE_BACKENDS", "").split(",") if b]
    report = edfkern.backends()
    missing = {b: report.get(b, {"reason": "not registered"})["reason"] for b in required
               if not report.get(b, {}).get("available")}
    if missing:
        raise pytest.UsageError(f"EDFKERN_REQUIRE_BACKENDS: unavailable backends: {missing}")
