"""Adversarial inputs, one test per class of misbehaviour, on every backend.

* aliasing: in-place ops refuse outputs that share memory with another argument or with themselves;
* labels: a stray label or a huge ``num_groups`` is refused before anything of size K is allocated,
  and label groups work on the meta device;
* registered ops and native functions: every ``torch.ops.edfkern`` op (under each backend) and every
  ``edfkern._C`` function (called directly) raises edfkern's ``TypeError``/``ValueError`` on bad
  arguments, in a subprocess so a crash fails the test;
* scalars: every scalar and size argument gets edfkern's ``TypeError``/``ValueError``;
* tiny shapes: every native op at N=1, C=1, h=w=1, P=1 agrees with the reference.

The cases come from the op table, ``tests/opinfo.py``. ``python -m tests.test_adversarial --sweep``
runs the whole battery (each case in a forked child, so a crash is counted, not fatal) and prints how
many inputs misbehaved, per class.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from typing import Callable

if __name__ == "__main__":  # the sweep and the subprocess battery run outside pytest
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

import edfkern
from tests.opinfo import cases, native_functions, srand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backend_names() -> list[str]:
    return [n for n, i in edfkern.backends().items() if i["available"] and "cpu" in i["devices"]]


def _snapshot(*tensors):
    """Copies of the storages behind ``tensors`` (views included), to prove nothing was written."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            base = t._base if t._base is not None else t
            out.append((base, base.detach().clone()))
    return out


def _assert_untouched(snap, what=""):
    for base, copy in snap:
        assert torch.equal(base.detach(), copy) or (base.isnan() == copy.isnan()).all() and torch.equal(
            base.detach().nan_to_num(), copy.nan_to_num()), f"{what}: a tensor was written before the error"


# ============================================================================ class 3: aliasing

ALIAS_CASES = cases("aliasing")


@pytest.mark.parametrize("case", [c for _, c in ALIAS_CASES], ids=[n for n, _ in ALIAS_CASES])
def test_inplace_rejects_aliasing(backend, case):
    fn, tensors, names = case()
    snap = _snapshot(*tensors)
    with pytest.raises(ValueError) as ei:
        fn()
    for n in names:
        assert n in str(ei.value), f"the error should name {n!r}: {ei.value}"
    _assert_untouched(snap, "aliasing")


def test_inplace_accepts_disjoint_views_of_one_buffer(backend):
    """Not over-conservative: param and buffer as disjoint halves of one tensor work like separate tensors."""
    N, Cc, H, W = 2, 3, 4, 5
    big = srand(2 * N, Cc, H, W, seed=1)
    g, cam = srand(N, Cc, H, W, seed=2), srand(N, 2, 3, seed=3).abs()
    p_ref, b_ref = big[:N].clone(), big[N:].clone()
    edfkern.dae_sgd_step_(p_ref, g, b_ref, cam, lr=0.1, beta=1.0, momentum=0.5)
    edfkern.dae_sgd_step_(big[:N], g, big[N:], cam, lr=0.1, beta=1.0, momentum=0.5)
    assert torch.equal(big[:N], p_ref) and torch.equal(big[N:], b_ref)
    # a non-contiguous (but non-overlapping) grad view is fine for dae_
    gg = srand(N, Cc, H, 2 * W, seed=4)[..., ::2]
    ref = gg.clone()
    edfkern.dae_(ref, cam, beta=1.0)
    edfkern.dae_(gg, cam, beta=1.0)
    assert torch.equal(gg, ref)


# ============================================================================ class 5: labels and memory

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


LABEL_CASES = cases("labels")


@pytest.mark.parametrize("case", [c for _, c in LABEL_CASES], ids=[n for n, _ in LABEL_CASES])
def test_labels_never_blow_up_memory(backend, case):
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as ei:
        case()
    dt = time.perf_counter() - t0
    grown = _peak_rss_mb() - before
    assert "groups" in str(ei.value) or "labels" in str(ei.value), ei.value
    assert dt < 2.0, f"the error took {dt:.1f} s: something of size K was built first"
    assert grown < 256, f"peak memory grew by {grown:.0f} MB before the error"


def test_local_covariance_allows_sparse_labels_up_to_the_bound(backend):
    """Empty groups are zeros for local_covariance: a K above N (but within MAX_SPARSE_GROUPS) still works."""
    x = srand(4, 2, 3, seed=0)
    lab = torch.tensor([0, 0, 9, 9])
    out = edfkern.local_covariance(x, groups=lab)
    assert out.shape == (10, 2, 2)
    with edfkern.use_backend("reference"):
        ref = edfkern.local_covariance(x, groups=lab)
    torch.testing.assert_close(out, ref)
    assert out[1:9].abs().max() == 0


def test_labels_on_meta_work_like_integer_groups():
    x = torch.empty(12, 4, 3, device="meta")
    feat = torch.empty(12, 5, device="meta")
    lab = torch.empty(12, dtype=torch.int64, device="meta")
    assert edfkern.local_covariance(x, groups=lab, num_groups=3).shape == (3, 4, 4)
    assert edfkern.local_covariance(x, groups=3).shape == (3, 4, 4)
    assert edfkern.class_centralization_loss(feat, groups=lab, num_groups=3).shape == ()
    assert edfkern.covariance_matching_loss(x, x, syn_groups=lab, real_groups=3, num_groups=3).shape == ()
    assert edfkern.mean_matching_loss(feat, feat, syn_groups=lab, real_groups=lab, num_groups=4).shape == ()
    for fn in (lambda: edfkern.local_covariance(x, groups=lab),
               lambda: edfkern.mean_matching_loss(feat, feat, syn_groups=lab, real_groups=lab)):
        with pytest.raises(ValueError, match="num_groups"):
            fn()


# ============================================================================ class 6: registered ops


def _battery(ns: str) -> list[tuple[str, Callable]]:
    """(label, thunk) pairs of bad calls to every op of ``ns``: ``"edfkern"`` (the registered ops) or
    ``"edfkern._C"`` (the native functions of the backend contract, called directly); each must raise."""
    if ns == "edfkern":
        return cases("bad", torch.ops.edfkern)
    return cases("bad_native", native_functions())


def _namespaces() -> list[tuple[str, str]]:
    """(what, backend for the edfkern:: ops) pairs to fuzz: the registered ops under every backend,
    and the native functions (the only backend functions that are compiled code, callable directly)."""
    out = [("edfkern", b) for b in _backend_names()]
    if "native" in _backend_names():
        out.append(("edfkern._C", "native"))
    return out


def _run_battery(ns: str, backend: str) -> int:
    """Child process: run every bad call, print one line per case; exit 0 iff each raised edfkern's
    TypeError / ValueError."""
    quiet = 0
    with edfkern.use_backend(backend):
        for label, fn in _battery(ns):
            print(f"RUN {label}", flush=True)
            try:
                fn()
            except (ValueError, TypeError, RuntimeError, IndexError) as e:
                ours = isinstance(e, (ValueError, TypeError))
                print(f"{'OK' if ours else 'FOREIGN'} {label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                      flush=True)
                quiet += not ours
            else:
                print(f"NOERROR {label}", flush=True)
                quiet += 1
    return 0 if quiet == 0 else 3


@pytest.mark.parametrize("ns,backend", _namespaces(), ids=[f"{n}-{b}" for n, b in _namespaces()])
def test_registered_ops_never_crash(ns, backend):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import tests.test_adversarial as t; " \
           f"sys.exit(t._run_battery({ns!r}, {backend!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    lines = r.stdout.splitlines()
    last = [ln for ln in lines if ln.startswith("RUN ")][-1:] or ["(none)"]
    assert r.returncode >= 0, f"{ns} under {backend}: killed by signal {-r.returncode} at {last[0]}\n{r.stderr[-2000:]}"
    bad = [ln for ln in lines if ln.startswith(("NOERROR", "FOREIGN"))]
    assert r.returncode == 0 and not bad, f"{ns} under {backend}: rc={r.returncode}; {bad}\n{r.stderr[-2000:]}"
    assert sum(ln.startswith("OK ") for ln in lines) == len(_battery(ns))


# ============================================================================ class 7: scalars


SCALAR_CASES = cases("scalars")


@pytest.mark.parametrize("case", SCALAR_CASES, ids=[c[0] for c in SCALAR_CASES])
def test_scalars_get_our_errors(backend, case):
    _, fn, exc = case
    if exc is None:
        fn()
        return
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    assert "must" in msg, f"not an edfkern message: {type(ei.value).__name__}: {msg}"


def test_numpy_scalars_give_the_same_result(backend):
    cam, g = srand(2, 3, 3, seed=0).abs(), srand(2, 3, 6, 6, seed=1)
    for beta in (np.float32(1.5), np.float64(1.5)):
        torch.testing.assert_close(edfkern.dae_mask(cam, beta=beta, size=(6, 6)),
                                   edfkern.dae_mask(cam, beta=1.5, size=(6, 6)), rtol=0, atol=0)
    a, b = g.clone(), g.clone()
    edfkern.dae_(a, cam, beta=np.float32(2.0), threshold=np.float64(0.25))
    edfkern.dae_(b, cam, beta=2.0, threshold=0.25)
    assert torch.equal(a, b)


# ============================================================================ class 8: tiny shapes (native)


TINY_CASES = cases("tiny")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("run", [c for _, c in TINY_CASES], ids=[n for n, _ in TINY_CASES])
def test_native_ops_at_tiny_shapes(run, dtype):
    if "native" not in _backend_names():
        pytest.skip("native backend not built")
    with edfkern.use_backend("reference"):
        ref = run(dtype)
    with edfkern.use_backend("native"):
        got = run(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    assert len(ref) > 0 and len(got) == len(ref), f"{len(got)} outputs, the reference gives {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"output {i}: {m}")


# ============================================================================ the sweep (before/after table)


def _sweep_class(cls: str) -> tuple[int, int]:
    """(misbehaving, total) inputs of one class, each run in a forked child with a time limit."""
    if cls == "aliasing":
        cases = ALIAS_CASES

        def judge(case):
            fn, tensors, names = case()
            snap = _snapshot(*tensors)
            try:
                fn()
            except ValueError as e:
                return all(n in str(e) for n in names) and _untouched(snap)
            except Exception:
                return False
            return False
    elif cls == "labels":
        cases = LABEL_CASES

        def judge(case):
            t0 = time.perf_counter()
            before = _peak_rss_mb()
            try:
                case()
            except ValueError:
                return time.perf_counter() - t0 < 2.0 and _peak_rss_mb() - before < 256
            except Exception:
                return False
            return False
    elif cls == "scalars":
        cases = [(c[0], c) for c in SCALAR_CASES]

        def judge(case):
            _, fn, exc = case
            try:
                fn()
            except Exception as e:
                return exc is not None and isinstance(e, exc) and "must" in str(e)
            return exc is None
    else:
        ns, backend = cls.split(":")
        cases = _battery(ns)

        def judge(fn):
            with edfkern.use_backend(backend):
                try:
                    fn()
                except (ValueError, TypeError):
                    return True
                except Exception:
                    return False
            return False
    bad = 0
    for name, case in cases:
        pid = os.fork()
        if pid == 0:
            signal_safe_exit = 0
            try:
                ok = judge(case)
                signal_safe_exit = 0 if ok else 1
            except BaseException:
                signal_safe_exit = 2
            os._exit(signal_safe_exit)
        deadline = time.time() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = 9
                break
            time.sleep(0.01)
        if status != 0:
            bad += 1
            print(f"  misbehaves: {cls} {name} (status {status})", flush=True)
    return bad, len(cases)


def _untouched(snap) -> bool:
    try:
        _assert_untouched(snap)
        return True
    except AssertionError:
        return False


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--sweep":
    classes = sys.argv[2:] or ["aliasing", "labels", "scalars"] + [f"{n}:{b}" for n, b in _namespaces()]
    rows = []
    for cls in classes:
        with edfkern.use_backend("reference" if ":" not in cls else "auto"):
            rows.append((cls, *_sweep_class(cls)))
    print("\n| class | misbehaving / inputs |\n|---|---|")
    for cls, bad, n in rows:
        print(f"| {cls} | {bad} / {n} |")
