"""The ``reference`` backend: pure, vectorised PyTorch. The oracle in tests.

Backend kernel contract
=======================
Every backend module (``edfkern.reference``, ``edfkern.triton``,
``edfkern.native``) exposes the functions below with exactly these arguments and
results, as plain functions (no ``torch.library`` registration of their own). Callers
(the registered ops in ``edfkern/ops/``, through ``edfkern._dispatch.kernel``) have
already checked every argument, so kernels do no validation. Tensors arrive
**contiguous**, on one device, detached and with grad mode off: kernels compute
values only (gradients are the ops' autograd formulas). A kernel whose name ends in
``_`` writes its first tensor(s) in place (``grad``; ``param`` and ``buf``) and
returns None; no kernel writes any other argument. ``acc`` means float64 for
float64 inputs, float32 otherwise (``edfkern._checks.acc_dtype``).
Groups arrive in CSR form: ``perm`` (int64 ``(N,)`` or ``None`` = identity) and
``offsets`` (int64 ``(K+1,)``); sorted row ``j`` is input row ``perm[j]`` and
class ``k`` owns sorted rows ``offsets[k]:offsets[k+1]`` (possibly empty).

DAE (``dae.py``; ``threshold=None`` means "per-image mean of the upsampled map"; math in
``acc_dtype(cam.dtype, grad.dtype)``: float64 when grad/param or cam is float64, else float32)
    dae_mask(cam (N,h,w), beta, threshold, H, W) -> (N,1,H,W) in cam.dtype
    dae_(grad (N,C,H,W), cam (N,h,w), beta, threshold) -> None   # grad *= mask
    dae_sgd_step_(param, grad, buf | None, cam, lr, beta, threshold, momentum,
                  dampening, weight_decay, nesterov, maximize, first_step) -> None
        torch.optim.SGD's single-tensor update on d = grad*mask, in acc; the
        buffer is stored in its dtype and the stored value feeds nesterov/param.
        ``buf`` is None exactly when momentum == 0.

Grad-CAM (``gradcam.py``)
    grad_cam(A, G, A_clean | None, method, normalize, size | None) -> (N,h,w) or (N,H,W), acc
        A, G: (N,C,h,w), or (S,N,C,h,w) with A_clean (N,C,h,w) for "smoothgradcam++".

CPD (``cpd.py``; l = (s-t)^2, d = (s0-t)^2 in acc; an index i is *dropped* iff
l_i < thr or (l_i == thr and i < tie); k == 0 gives thr=-inf, tie=0)
    cpd_forward(student (P,), target (P,), start (P,), k) -> (sum_l, sum_d, thr, tie)
        0-d tensors: sums over the kept set and thr in acc, tie int64.
    cpd_backward(grad_out 0-d, student, target, start, thr, tie, sum_d) -> (P,) student.dtype
        grad_out * 2 (s-t) * keep / sum_d
    cpd_keep_mask(l (P,), k) -> bool (P,)

Covariance (``covariance.py``)
    cov_forward(x (N,C,L), perm, offsets) -> (sigma (K,C,C) acc, mean (K,C,L) acc)
        sigma_k = 1/n_k sum_i (x_i - mean_k)(x_i - mean_k)^T; zeros for empty groups.
    cov_backward(x (N,C,L), perm, offsets, mean (K,C,L), M (K,C,C)) -> (N,C,L) x.dtype
        grad_i = M_k (x_i - mean_k) for i in group k.

Flat features (``features.py``)
    seg_mean(x (N,D), perm, offsets) -> (K,D) acc (zeros for empty groups)
    cc_forward(x (N,D), perm, offsets) -> (sum_i ||x_i - mu_k||^2 as 0-d acc, mean (K,D) acc)
    cc_backward(grad_out 0-d, x, perm, offsets, mean, coef) -> (N,D) x.dtype
        coef * grad_out * (x_i - mu_k)
"""
from .cpd import cpd_backward, cpd_forward, cpd_keep_mask
from .covariance import cov_backward, cov_forward
from .dae import dae_, dae_mask, dae_sgd_step_
from .features import cc_backward, cc_forward, seg_mean
from .gradcam import grad_cam

__all__ = [
    "dae_mask", "dae_", "dae_sgd_step_", "grad_cam", "cpd_forward", "cpd_backward", "cpd_keep_mask",
    "cov_forward", "cov_backward", "seg_mean", "cc_forward", "cc_backward",
]

#: Each public op's contract kernels, the forward one first: the one map between the two vocabularies
#: (``edfkern.local_covariance`` runs ``cov_forward`` and, in backward, ``cov_backward``). The bench and
#: the GPU tools read it to name an op's kernel.
OP_KERNELS: dict[str, tuple[str, ...]] = {
    "dae_mask": ("dae_mask",),
    "dae_": ("dae_",),
    "dae_sgd_step_": ("dae_sgd_step_",),
    "grad_cam": ("grad_cam",),
    "cpd_trajectory_loss": ("cpd_forward", "cpd_backward"),
    "cpd_keep_mask": ("cpd_keep_mask",),
    "local_covariance": ("cov_forward", "cov_backward"),
    "covariance_matching_loss": ("cov_forward", "cov_backward"),
    "class_centralization_loss": ("cc_forward", "cc_backward"),
    "mean_matching_loss": ("seg_mean",),
}
