"""The loop formulations DD code runs today, written from the method descriptions in docs/ops.md.

These are the "original" rows of every benchmark and the second oracle in tests.
They are deliberately the per-image / per-class / per-sample Python loops of the
authors' released code (EDF's ``create_soft_mask`` and CPD sort block, IID's
per-class ``loss_cov`` / ``loss_insdis`` and DM's per-class means, EDF's per-class
Grad-CAM passes), not tuned. Groups are ``int`` K (contiguous blocks) or ``(N,)`` labels,
as in the ops (``edfkern._checks.GroupsArg``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import GroupsArg


def _members(groups: GroupsArg, n: int, num_groups: Optional[int] = None) -> list[Tensor]:
    """Row indices of every class, in order."""
    if isinstance(groups, int):
        ipc = n // groups
        return [torch.arange(k * ipc, (k + 1) * ipc) for k in range(groups)]
    k = num_groups if num_groups is not None else int(groups.max()) + 1
    return [torch.nonzero(groups == c).flatten() for c in range(k)]


# ----------------------------------------------------------------------------- DAE (EDF)


def create_soft_mask(cam: Tensor, size: tuple[int, int], beta: float, threshold: Optional[float] = None) -> Tensor:
    """EDF's per-image mask loop: upsample each CAM, threshold at its mean, ``cam + beta`` above, 1 below.

    cam (N, h, w) or (N, 1, h, w) -> (N, 1, H, W). One rule added to EDF's loop (docs/special-values.md):
    a flat map (every value the same finite ``c``) upsamples to ``c`` exactly and its mean is ``c``, as
    in exact arithmetic, so the mean threshold keeps every pixel (rounding in interpolate and mean
    would otherwise flip an arbitrary subset of them).
    """
    if cam.dim() == 4:
        cam = cam[:, 0]
    masks = []
    for i in range(cam.shape[0]):
        c = cam[i].float()
        up = F.interpolate(c[None, None], size=size, mode="bilinear", align_corners=False)
        tau = up.mean() if not threshold else threshold
        if bool(c.min() == c.max()) and bool(c.min().isfinite()):
            up = torch.full_like(up, c.min().item())
            tau = c.min() if not threshold else threshold
        masks.append(torch.where(up >= tau, up + beta, torch.ones_like(up)))
    return torch.cat(masks, 0)


def dae_(grad: Tensor, cam: Tensor, *, beta: float, threshold: Optional[float] = None) -> Tensor:
    """``grad *= create_soft_mask(...)``, as EDF does after ``backward()``."""
    grad *= create_soft_mask(cam, tuple(grad.shape[-2:]), beta, threshold)
    return grad


def dae_sgd_step_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], cam: Tensor, *, lr: float,
                  beta: float, threshold: Optional[float] = None, momentum: float = 0.5, dampening: float = 0.0,
                  weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                  first_step: bool = False) -> Tensor:
    """Mask loop, ``grad * mask``, then a real ``torch.optim.SGD.step()`` on ``param``.

    The buffer is handed to (and read back from) the optimizer's state, so this is exactly torch's update.
    """
    masked = grad * create_soft_mask(cam, tuple(grad.shape[-2:]), beta, threshold)
    p = torch.nn.Parameter(param.detach().clone())
    p.grad = masked.to(p.dtype)
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                          nesterov=nesterov, maximize=maximize)
    if momentum != 0 and not first_step:
        opt.state[p]["momentum_buffer"] = momentum_buffer.detach().clone()
    opt.step()
    with torch.no_grad():
        param.copy_(p)
        if momentum != 0:
            momentum_buffer.copy_(opt.state[p]["momentum_buffer"])
    return param


# ----------------------------------------------------------------------------- Grad-CAM


_CAM_EPS = 1e-8


def _cam_weights(method: str, a: Tensor, g: Tensor, clean: Optional[Tensor] = None) -> Tensor:
    """torchcam-0.4 channel weights ``(..., C)`` of one map or a batch of maps ``(..., C, h, w)``.

    For ``"smoothgradcam++"``, ``g`` holds the S noisy passes first, ``(S, ..., C, h, w)``, and
    ``clean`` the clean activations of alpha's denominator; the weights use the last pass.
    """
    hw = (-2, -1)
    if method == "smoothgradcam++":
        d2, d3 = (g ** 2).mean(0), (g ** 3).mean(0)
        alpha = d2 / (2 * d2 + (clean * d3).sum(dim=hw, keepdim=True) + _CAM_EPS)
        return (alpha * torch.relu(g[-1])).sum(dim=hw)
    if method == "gradcam":
        return g.mean(dim=hw)
    alpha = g ** 2 / (2 * g ** 2 + (a * g ** 3).sum(dim=hw, keepdim=True) + _CAM_EPS)
    return (alpha * torch.relu(g)).sum(dim=hw)


def _cam_map(w: Tensor, a: Tensor, normalize: bool) -> Tensor:
    """``ReLU(sum_c w_c A_c)``, then per-map ``cam -= min; cam /= max + 1e-8``: (..., C, h, w) -> (..., h, w)."""
    cam = torch.relu((w[..., None, None] * a).sum(-3))
    if normalize:
        cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
        cam = cam / (cam.amax(dim=(-2, -1), keepdim=True) + _CAM_EPS)
    return cam


def grad_cam(activations: Tensor, gradients: Tensor, *, method: str = "gradcam", size=None, normalize: bool = True,
             clean_activations: Optional[Tensor] = None) -> Tensor:
    """One image at a time, as torchcam computes a map, stacked."""
    smooth = method == "smoothgradcam++"
    n = activations.shape[1] if smooth else activations.shape[0]
    out = []
    for i in range(n):
        if smooth:
            a, g, clean = activations[-1, i].float(), gradients[:, i].float(), clean_activations[i].float()
        else:
            a, g, clean = activations[i].float(), gradients[i].float(), None
        cam = _cam_map(_cam_weights(method, a, g, clean), a, normalize)
        if size is not None:
            cam = F.interpolate(cam[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        out.append(cam)
    return torch.stack(out)


def cams_per_class(model: nn.Module, layer: nn.Module, images: Tensor, ipc: int, *, num_samples: int = 4,
                   std: float = 0.3, generator: Optional[torch.Generator] = None,
                   noise: Optional[Tensor] = None) -> Tensor:
    """EDF's ``get_activation_maps``: one torchcam-0.4 ``SmoothGradCAMpp`` pass per class.

    ``images`` is ``(K * ipc, C, H, W)``, class ``c`` owning rows ``c*ipc : (c+1)*ipc``; returns the
    normalised ``(K * ipc, h, w)`` maps at ``layer``'s resolution, each for its own class. Per class:
    a clean forward (the activations of alpha's denominator), then ``num_samples`` noisy forward +
    ``backward()`` passes (gradients from a tensor hook on ``layer``'s output, ``model.zero_grad()``
    before each), then the class's maps at once, as torchcam computes them. The noise follows ``CAMExtractor``'s
    convention (one ``randn(images.shape, generator=generator) * std`` per pass, drawn first), so the
    maps are comparable with the extractor's (``noise=``: the draws given, as ``CAMExtractor(noise=)``).
    The model runs in eval mode; every module's mode is restored and
    its parameters' ``.grad`` are left ``None``.
    """
    if noise is not None:  # given standard-normal draws, (num_samples, *images.shape), as CAMExtractor takes them
        noises = [noise[s].to(images.dtype) * std for s in range(num_samples)]
    else:
        noises = [torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device) * std
                  for _ in range(num_samples)]
    store = {}

    def hook(m, i, o):
        store["a"] = o.detach()
        if o.requires_grad:
            o.register_hook(lambda g: store.__setitem__("g", g.detach()))

    handle = layer.register_forward_hook(hook)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    maps = []
    try:
        for c in range(images.shape[0] // ipc):
            rows = slice(c * ipc, (c + 1) * ipc)
            x = images[rows].detach()
            model(x)
            a_clean = store["a"]
            grads = []
            for s in range(num_samples):
                out = model(x + noises[s][rows])
                model.zero_grad()
                out[:, c].sum().backward()
                grads.append(store["g"])
            w = _cam_weights("smoothgradcam++", store["a"], torch.stack(grads), a_clean)  # last pass's A
            maps.append(_cam_map(w, store["a"], True))
    finally:
        handle.remove()
        for m, training in modes:
            m.train(training)
        model.zero_grad(set_to_none=True)
    return torch.cat(maps)


# ----------------------------------------------------------------------------- CPD (EDF)


def cpd_keep_mask(l: Tensor, drop_ratio: float) -> Tensor:
    """Full stable sort, then drop the first ``floor(drop_ratio * P)`` indices."""
    flat = l.reshape(-1)
    k = int(math.floor(drop_ratio * flat.numel()))
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(l.shape)


def cpd_trajectory_loss(student: Tensor, target: Tensor, start: Tensor, *, drop_ratio: float) -> Tensor:
    """EDF's CPD block: element-wise losses, full sort, gather the kept tail, ratio of sums."""
    s, t, s0 = student.reshape(-1).float(), target.reshape(-1).float(), start.reshape(-1).float()
    if student.dtype == torch.float64:
        s, t, s0 = student.reshape(-1), target.reshape(-1), start.reshape(-1)
    l = (s - t) ** 2
    d = (s0 - t) ** 2
    k = int(math.floor(drop_ratio * l.numel()))
    _, idx = torch.sort(l.detach(), stable=True)
    kept = idx[k:]
    return l[kept].sum() / d[kept].sum()


# ----------------------------------------------------------------------------- IID / DM


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def local_covariance(x: Tensor, *, groups: GroupsArg, num_groups: Optional[int] = None) -> Tensor:
    """IID's per-class covariance: centre the class, form every (C, C) product, average them."""
    x = _acc(x.flatten(2) if x.dim() == 4 else (x[:, :, None] if x.dim() == 2 else x))
    out = []
    for idx in _members(groups, x.shape[0], num_groups):
        if idx.numel() == 0:
            out.append(x.new_zeros(x.shape[1], x.shape[1]))
            continue
        xk = x[idx]
        xc = xk - xk.mean(0, keepdim=True)
        prods = torch.bmm(xc, xc.transpose(1, 2))  # (n, C, C): the per-sample products
        out.append(prods.mean(0))
    return torch.stack(out)


def covariance_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: GroupsArgArg, real_groups: GroupsArgArg,
                             num_groups: Optional[int] = None, weight: float = 0.01) -> Tensor:
    """``loss_cov`` of IID, class by class."""
    k_syn = _members(syn_groups, syn.shape[0], num_groups)
    k_real = _members(real_groups, real.shape[0], num_groups)
    loss = 0.0
    for i_s, i_r in zip(k_syn, k_real):
        cs = local_covariance(syn[i_s], groups=1)[0]
        cr = local_covariance(real[i_r], groups=1)[0]
        loss = loss + ((cr - cs) ** 2).sum()
    return weight * loss


def class_centralization_loss(feat: Tensor, *, groups: GroupsArg, num_groups: Optional[int] = None,
                              weight: float = 0.05) -> Tensor:
    """``loss_insdis`` of IID (linear form): a loop over classes and, inside, over samples."""
    f = _acc(feat.reshape(feat.shape[0], -1))
    loss = 0.0
    for idx in _members(groups, f.shape[0], num_groups):
        fk = f[idx]
        mu = fk.mean(0)
        for i in range(fk.shape[0]):
            loss = loss + ((fk[i] - mu) ** 2).sum()
    return weight * loss


def mean_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: GroupsArgArg, real_groups: GroupsArgArg,
                       num_groups: Optional[int] = None, weight: float = 1.0) -> Tensor:
    """DM's ``loss_ori``: per-class mean embeddings, squared distance, summed over classes."""
    s = _acc(syn.reshape(syn.shape[0], -1))
    r = _acc(real.reshape(real.shape[0], -1))
    loss = 0.0
    for i_s, i_r in zip(_members(syn_groups, s.shape[0], num_groups), _members(real_groups, r.shape[0], num_groups)):
        loss = loss + ((r[i_r].mean(0) - s[i_s].mean(0)) ** 2).sum()
    return weight * loss


# ----------------------------------------------------------------------------- trajectory matching (MTT / DATM / EDF)


def trajectory_matching_loop(forward, images: Tensor, labels: Tensor, start: Tensor, target: Tensor, syn_lr: Tensor, *,
                             syn_steps: int, batch_syn: int, batches: Optional[list[Tensor]] = None, augment=None,
                             generator: Optional[torch.Generator] = None, loss_fn=None,
                             drop_ratio: float = 0.0) -> Tensor:
    """The authors' unrolled student (MTT's ``distill.py``, DATM's and EDF's ``edf_distill.py`` inner loop).

    Every step keeps its graph (``create_graph=True``), so ``.backward()`` of the result reaches
    ``images``, ``labels`` (soft labels) and ``syn_lr`` through all ``syn_steps`` updates. Without
    ``batches``, minibatches are drawn as the authors do: a ``randperm`` of the N images split into
    chunks of ``batch_syn``, taken from the end of the list (``indices_chunks.pop()``) and refilled
    when empty; the permutation is drawn just before the step that needs it (from ``generator``, or
    torch's default CPU generator as in the released code), before that step's augmentation.
    ``loss_fn(logits, labels[b])`` defaults to ``F.cross_entropy`` (DATM/EDF's ``criterion``; float
    ``(N, K)`` labels are class probabilities there). The loss at the end is CPD's
    (:func:`cpd_trajectory_loss`; ``drop_ratio=0`` is MTT's ``param_loss / param_dist``).
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    student_params = [start.detach().reshape(-1).clone().requires_grad_(True)]
    indices_chunks: list[Tensor] = []
    for step in range(syn_steps):
        if batches is not None:
            these_indices = batches[step]
        else:
            if not indices_chunks:
                indices = torch.randperm(len(images), generator=generator)
                indices_chunks = list(torch.split(indices, batch_syn))
            these_indices = indices_chunks.pop()
        x = images[these_indices]
        this_y = labels[these_indices]
        if augment is not None:
            x = augment(x)
        out = forward(student_params[-1], x)
        ce_loss = loss_fn(out, this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    return cpd_trajectory_loss(student_params[-1], target.reshape(-1), start.reshape(-1), drop_ratio=drop_ratio)
