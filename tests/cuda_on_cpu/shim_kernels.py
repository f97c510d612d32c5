"""The backend kernel contract (``edfkern.reference``'s functions) on the CUDA source run on the CPU.

Each function does what the CUDA path of ``csrc/edfkern.cpp`` does around a launcher (the mask
dtype, output and workspace allocation, zero-filled where that path zero-fills), with CPU tensors'
data pointers standing in for device memory, and calls the torch-free launcher
(``edfkern::cuda::<op>``) of the library built by ``shim_build.py``, through its extern "C" bridge.

Every call runs the launcher once per run order (``ORDERS``: threads and blocks forward, reverse and
shuffled) on fresh copies of its inputs, and checks that the results are the same bits; the one
exception is CPD's kept sums, which blocks add with float64 atomics, so their order changes the
rounding: those are compared within a few ulps of the acc dtype instead. The forward order's
results are returned. Uninitialised memory (``at::empty``) is filled with 0xff bytes: NaN in any float
dtype, so a kernel that reads what it never wrote shows it.
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Optional, Sequence

import torch

from shim_build import CSRC, build

ORDER_ENV = "EDFKERN_CUDA_ON_CPU_ORDER"
ORDERS = ("forward", "reverse", "random:20261205")
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CAM_METHOD = {"gradcam": 0, "gradcam++": 1, "smoothgradcam++": 2}
ERROR_NAME = {1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration", 719: "cudaErrorLaunchFailure"}

P = ctypes.c_void_p
I64 = ctypes.c_int64
INT = ctypes.c_int
DBL = ctypes.c_double
SIGNATURES = {  # extern "C" name: argument types (shim/bridge.cpp); every one returns int except the sizes
    "cucpu_dae_mask": [P, INT, P, INT, P, DBL, INT, DBL, P],
    "cucpu_dae_apply": [P, INT, P, INT, P, DBL, INT, DBL, P],
    "cucpu_dae_sgd_step": [P, P, P, INT, P, INT, P, DBL, INT, DBL, P, P, P],
    "cucpu_grad_cam": [P, P, P, INT, INT, INT, I64, I64, I64, I64, I64, I64, I64, INT, P, P],
    "cucpu_cpd_forward": [P, P, P, INT, I64, I64, P, P, P, P, P],
    "cucpu_cpd_backward": [P, P, P, INT, I64, P, P, P, P],
    "cucpu_cpd_keep_mask": [P, INT, I64, I64, P, P],
    "cucpu_cov_forward": [P, INT, P, P, I64, I64, I64, I64, P, P],
    "cucpu_cov_backward": [P, INT, P, P, I64, I64, I64, I64, P, P, P],
    "cucpu_seg_mean": [P, INT, P, P, I64, I64, I64, P],
    "cucpu_cc_forward": [P, INT, P, P, I64, I64, I64, P, P, P],
    "cucpu_cc_backward": [P, P, INT, P, P, I64, I64, I64, P, DBL, P],
}


class ShimError(RuntimeError):
    """A launcher returned an error (a launch limit, or a shim check that stopped a kernel)."""


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def garbage(*shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` with its bytes set to 0xff (NaN in every float dtype, -1 in integers)."""
    t = torch.empty(*shape, dtype=dtype)
    if t.numel():
        t.view(-1).view(torch.uint8).fill_(0xFF)
    return t


def _ptr(t: Optional[torch.Tensor]):
    """The data pointer of a tensor the caller keeps alive for the call (None: a null pointer)."""
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu", "the launchers take contiguous CPU tensors here"
    return t.data_ptr()


def _addr(arr) -> int:
    """The address of a ctypes array (the bridge takes the launchers' small structs as arrays)."""
    return ctypes.addressof(arr)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN payloads and signed zeros compared as they are)."""
    return t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


class ShimKernels:
    """``K`` for the kernel-contract tests: the reference kernels' signatures on the shim library."""

    __name__ = "cuda_on_cpu"

    def __init__(self, lib_path, orders: Sequence[str] = ORDERS):
        self.lib = ctypes.CDLL(str(lib_path))
        self.orders = tuple(orders)
        self.lib.cucpu_message.restype = ctypes.c_char_p
        for name, args in SIGNATURES.items():
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = args, ctypes.c_int
        for name, arg in (("cucpu_dae_workspace_bytes", P), ("cucpu_cpd_workspace_bytes", I64)):
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [arg], ctypes.c_size_t

    # ------------------------------------------------------------------ running in every order

    def _call(self, name: str, *args) -> None:
        self.lib.cucpu_reset()
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            msg = self.lib.cucpu_message().decode()
            raise ShimError(f"{name}: {ERROR_NAME.get(rc, 'cudaError')} ({rc}): {msg}")

    def _orders(self, op: str, run: Callable[[], tuple], inexact: Sequence[int] = ()) -> tuple:
        """``run()`` once per order; its outputs must agree bit for bit (``inexact`` indices: within
        four ulps of their dtype, or 1e-12 relative in float64, for sums of float atomics)."""
        old = os.environ.get(ORDER_ENV)
        results = []
        try:
            for order in self.orders:
                os.environ[ORDER_ENV] = order
                results.append(run())
        finally:
            if old is None:
                os.environ.pop(ORDER_ENV, None)
            else:
                os.environ[ORDER_ENV] = old
        first = results[0]
        for order, res in zip(self.orders[1:], results[1:]):
            for i, (a, b) in enumerate(zip(first, res)):
                if i in inexact:
                    rtol = 1e-12 if a.dtype == torch.float64 else 4 * torch.finfo(a.dtype).eps
                    torch.testing.assert_close(b, a, rtol=rtol, atol=0.0, equal_nan=True,
                                               msg=lambda m: f"{op} output {i}, {order} vs {self.orders[0]}: {m}")
                elif not torch.equal(_bits(a), _bits(b)):
                    diff = (_bits(a) != _bits(b)).nonzero()[:4].flatten().tolist()
                    raise AssertionError(f"{op} output {i}: {order} order differs from {self.orders[0]} "
                                         f"(first differing bytes {diff})")
        return first

    # ------------------------------------------------------------------ DAE

    @staticmethod
    def _mask_cam(cam: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        m = torch.float64 if torch.float64 in (cam.dtype, scaled.dtype) else torch.float32
        return cam.to(m).contiguous()

    def _dae_ws(self, shape) -> torch.Tensor:
        return garbage(self.lib.cucpu_dae_workspace_bytes(_addr(shape)), dtype=torch.uint8)

    @staticmethod
    def _thr(threshold):
        return (0, 0.0) if threshold is None else (1, float(threshold))

    def dae_mask(self, cam, beta, threshold, H, W):
        cm = self._mask_cam(cam, cam)
        n, h, w = cm.shape
        shape = (I64 * 6)(n, 1, h, w, H, W)

        def run():
            out, ws = garbage(n, 1, H, W, dtype=cam.dtype), self._dae_ws(shape)
            self._call("cucpu_dae_mask", _ptr(cm), DTYPE_CODE[cm.dtype], _ptr(out), DTYPE_CODE[out.dtype], _addr(shape),
                       beta, *self._thr(threshold), _ptr(ws))
            return (out,)

        return self._orders("dae_mask", run)[0]

    def dae_(self, grad, cam, beta, threshold):
        cm = self._mask_cam(cam, grad)
        shape = (I64 * 6)(*grad.shape[:2], *cm.shape[1:], *grad.shape[2:])

        def run():
            g, ws = grad.clone(), self._dae_ws(shape)
            self._call("cucpu_dae_apply", _ptr(g), DTYPE_CODE[g.dtype], _ptr(cm), DTYPE_CODE[cm.dtype], _addr(shape), beta,
                       *self._thr(threshold), _ptr(ws))
            return (g,)

        grad.copy_(self._orders("dae_", run)[0])

    def dae_sgd_step_(self, param, grad, buf, cam, lr, beta, threshold, momentum, dampening, weight_decay, nesterov,
                      maximize, first_step):
        cm = self._mask_cam(cam, grad)
        shape = (I64 * 6)(*param.shape[:2], *cm.shape[1:], *param.shape[2:])
        sgd = (DBL * 4)(lr, momentum, dampening, weight_decay)
        flags = (INT * 3)(int(nesterov), int(maximize), int(first_step))
        use_buf = momentum != 0

        def run():
            p, b = param.clone(), buf.clone() if use_buf else None
            ws = self._dae_ws(shape)
            self._call("cucpu_dae_sgd_step", _ptr(p), _ptr(grad.contiguous()), _ptr(b), DTYPE_CODE[p.dtype], _ptr(cm),
                       DTYPE_CODE[cm.dtype], _addr(shape), beta, *self._thr(threshold), sgd, flags,
                       _ptr(ws))
            return (p, b) if use_buf else (p,)

        out = self._orders("dae_sgd_step_", run)
        param.copy_(out[0])
        if use_buf:
            buf.copy_(out[1])

    # ------------------------------------------------------------------ Grad-CAM

    def grad_cam(self, A, G, A_clean, method, normalize, size):
        smooth = method == "smoothgradcam++"
        A, G = A.contiguous(), G.contiguous()
        S = A.shape[0] if smooth else 1
        n, c, h, w = A.shape[-4:]
        H, W = size if size is not None else (h, w)
        acc = acc_of(A.dtype)
        Ac = A_clean.contiguous() if smooth else None

        def run():
            out = garbage(n, H, W, dtype=acc)
            ws = garbage(n * c + n * h * w, dtype=acc)
            self._call("cucpu_grad_cam", _ptr(A), _ptr(G), _ptr(Ac), DTYPE_CODE[A.dtype], CAM_METHOD[method],
                       int(normalize), S, n, c, h, w, H, W, int(size is not None), _ptr(out), _ptr(ws))
            return (out,)

        return self._orders("grad_cam", run)[0]

    # ------------------------------------------------------------------ CPD

    def _cpd_ws(self, p: int) -> torch.Tensor:
        return garbage(self.lib.cucpu_cpd_workspace_bytes(p), dtype=torch.uint8)

    def cpd_forward(self, student, target, start, k):
        s, t, s0 = student.contiguous(), target.contiguous(), start.contiguous()
        p, acc = s.numel(), acc_of(s.dtype)

        def run():
            sl, sd, thr = (garbage((), dtype=acc) for _ in range(3))
            tie, ws = garbage((), dtype=torch.int64), self._cpd_ws(p)
            self._call("cucpu_cpd_forward", _ptr(s), _ptr(t), _ptr(s0), DTYPE_CODE[s.dtype], p, k, _ptr(sl), _ptr(sd),
                       _ptr(thr), _ptr(tie), _ptr(ws))
            return sl, sd, thr, tie

        return self._orders("cpd_forward", run, inexact=(0, 1))

    def cpd_backward(self, grad_out, student, target, start, thr, tie, sum_d):
        acc = acc_of(student.dtype)
        go, th, sd = (v.to(acc).contiguous() for v in (grad_out, thr, sum_d))
        ti, s, t = tie.contiguous(), student.contiguous(), target.contiguous()

        def run():
            out = garbage(*s.shape, dtype=s.dtype)
            self._call("cucpu_cpd_backward", _ptr(go), _ptr(s), _ptr(t), DTYPE_CODE[s.dtype], s.numel(), _ptr(th),
                       _ptr(ti), _ptr(sd), _ptr(out))
            return (out,)

        return self._orders("cpd_backward", run)[0]

    def cpd_keep_mask(self, l, k):
        lc, p = l.contiguous(), l.numel()

        def run():
            out, ws = garbage(p, dtype=torch.bool), self._cpd_ws(p)
            self._call("cucpu_cpd_keep_mask", _ptr(lc), DTYPE_CODE[lc.dtype], p, k, _ptr(out), _ptr(ws))
            return (out,)

        return self._orders("cpd_keep_mask", run)[0]

    # ------------------------------------------------------------------ covariance

    def cov_forward(self, x, perm, offsets):
        x, n, (c, L), K = x.contiguous(), x.shape[0], x.shape[1:], offsets.numel() - 1
        acc = acc_of(x.dtype)

        def run():
            sigma, mean = torch.zeros(K, c, c, dtype=acc), torch.zeros(K, c, L, dtype=acc)
            self._call("cucpu_cov_forward", _ptr(x), DTYPE_CODE[x.dtype], _ptr(perm), _ptr(offsets), n, K, c, L,
                       _ptr(sigma), _ptr(mean))
            return sigma, mean

        return self._orders("cov_forward", run)

    def cov_backward(self, x, perm, offsets, mean, M):
        x, n, (c, L), K = x.contiguous(), x.shape[0], x.shape[1:], offsets.numel() - 1
        acc = acc_of(x.dtype)
        m, Mc = mean.to(acc).contiguous(), M.to(acc).contiguous()

        def run():
            out = garbage(*x.shape, dtype=x.dtype)
            self._call("cucpu_cov_backward", _ptr(x), DTYPE_CODE[x.dtype], _ptr(perm), _ptr(offsets), n, K, c, L,
                       _ptr(m), _ptr(Mc), _ptr(out))
            return (out,)

        return self._orders("cov_backward", run)[0]

    # ------------------------------------------------------------------ flat features

    def seg_mean(self, x, perm, offsets):
        x, (n, d), K = x.contiguous(), x.shape, offsets.numel() - 1

        def run():
            mean = torch.zeros(K, d, dtype=acc_of(x.dtype))
            self._call("cucpu_seg_mean", _ptr(x), DTYPE_CODE[x.dtype], _ptr(perm), _ptr(offsets), n, K, d, _ptr(mean))
            return (mean,)

        return self._orders("seg_mean", run)[0]

    def cc_forward(self, x, perm, offsets):
        x, (n, d), K = x.contiguous(), x.shape, offsets.numel() - 1
        acc = acc_of(x.dtype)

        def run():
            mean, sq = torch.zeros(K, d, dtype=acc), torch.zeros((), dtype=acc)
            ws = garbage(max(1, K * d), dtype=torch.float64)
            self._call("cucpu_cc_forward", _ptr(x), DTYPE_CODE[x.dtype], _ptr(perm), _ptr(offsets), n, K, d,
                       _ptr(mean), _ptr(sq), _ptr(ws))
            return sq, mean

        return self._orders("cc_forward", run)

    def cc_backward(self, grad_out, x, perm, offsets, mean, coef):
        x, (n, d), K = x.contiguous(), x.shape, offsets.numel() - 1
        acc = acc_of(x.dtype)
        go, m = grad_out.to(acc).contiguous(), mean.to(acc).contiguous()

        def run():
            out = garbage(n, d, dtype=x.dtype)
            self._call("cucpu_cc_backward", _ptr(go), _ptr(x), DTYPE_CODE[x.dtype], _ptr(perm), _ptr(offsets), n, K,
                       d, _ptr(m), coef, _ptr(out))
            return (out,)

        return self._orders("cc_backward", run)[0]


_LOADED: dict = {}


def kernels(variant: Optional[str] = None, orders: Optional[Sequence[str]] = None) -> ShimKernels:
    """The shim kernels of the ``variant`` build (default ``$EDFKERN_CUDA_ON_CPU_VARIANT`` or plain), run
    in ``orders`` (default ``$EDFKERN_CUDA_ON_CPU_ORDERS``, comma-separated, or ORDERS), built from
    ``$EDFKERN_CUDA_ON_CPU_CSRC`` (a copy of csrc with a seeded bug) or the repository's csrc."""
    variant = variant or os.environ.get("EDFKERN_CUDA_ON_CPU_VARIANT", "plain")
    orders = orders or [o for o in os.environ.get("EDFKERN_CUDA_ON_CPU_ORDERS", "").split(",") if o] or ORDERS
    csrc = os.environ.get("EDFKERN_CUDA_ON_CPU_CSRC") or CSRC
    key = (variant, tuple(orders), str(csrc))
    if key not in _LOADED:
        _LOADED[key] = ShimKernels(build(variant, csrc=csrc), orders)
    return _LOADED[key]
