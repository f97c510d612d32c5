"""Batched Grad-CAM extraction for a whole synthetic set (docs/ops.md, Grad-CAM, `CAMExtractor`).

EDF's released code builds one torchcam ``SmoothGradCAMpp`` per class and calls it
class by class: per class one clean forward plus ``num_samples`` noisy forward and
backward passes, each ``backward()`` writing into the parameters' ``.grad``.
:class:`CAMExtractor` computes the same maps for all N images at once:

* one clean forward (``smoothgradcam++`` only) and one noisy forward+backward over
  all ``num_samples * N`` noisy rows, split into chunks of at most ``batch_size`` rows;
* gradients by ``torch.autograd.grad`` on the hooked activations, so no parameter
  ``.grad`` is created or touched, and the backward stops at the target layer
  (the layers before it run without building a graph);
* the maps by the fused op :func:`edfkern.grad_cam`.

Noise convention (how to reproduce a run): for each noisy pass ``s = 0 .. S-1``, one
draw ``torch.randn(images.shape, generator=generator) * std`` is added to all N images.
``noise=`` replaces these draws by given standard-normal ones (still multiplied by ``std``).
EDF draws its noise in another order: per class, one draw for the per-class ``DataLoader``'s
iterator and then torchcam's ``num_samples`` draws of ``(ipc, C, H, W)``.
:func:`torchcam_noise` builds that noise, so the maps equal EDF's torchcam maps draw for draw.

**Labels.** EDF learns ``label_syn`` as ``(N, K)`` float soft labels and explains the class
``label_syn.argmax(dim=-1)`` (``utils/gradcam.py``). The extractor takes such labels as they are.

**Several layers at once.** Given a list of target layers, the extractor hooks them all and
runs the clean and noisy passes once for all of them: the backward of each noisy pass gives
the gradients at every hooked layer (one ``torch.autograd.grad`` call). So every layer sees
the *same* noise draws. Separate torchcam runs, one per layer as EDF's Comp-DD scoring does,
draw fresh noise for each layer; per layer, the maps are those of a single-layer extractor
given the same noise, so the two agree in distribution but not draw for draw.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .ops.gradcam import METHODS, grad_cam

__all__ = ["CAMExtractor", "torchcam_noise"]

ClassIdx = Union[int, Sequence[int], Tensor, str]
Layer = Union[nn.Module, str]


class CAMExtractor:
    """Grad-CAM / Grad-CAM++ / torchcam-0.4 Smooth Grad-CAM++ maps for a batch, in few passes.

    Args:
        model: a classifier returning pre-softmax logits ``(B, K)``.
        target_layer: the module whose output is explained, or its dotted name in
            ``model.named_modules()`` (e.g. ``"layer4"``, ``"features.3"``); or a list/tuple of
            them, in which case a call returns a list of maps, one per layer, in that order, all
            from one shared set of passes (the same noise for every layer).
        method: ``"gradcam"``, ``"gradcam++"`` or ``"smoothgradcam++"`` (EDF's choice, the default).
        num_samples: noisy passes for ``"smoothgradcam++"`` (torchcam's default is 4).
        std: standard deviation of the Gaussian input noise (torchcam: 0.3).
        batch_size: most rows (images, noisy copies included) per forward pass; ``None`` puts all
            ``num_samples * N`` noisy rows in one pass.

    The model is left exactly as found: no hooks outside a call (they are registered for the
    duration of each call and removed in a ``finally``), no ``.grad`` created or changed, the same
    ``requires_grad`` flags, and every module's ``training`` flag restored. The passes run with the
    model in eval mode: in train mode BatchNorm would mix the images of a batch (so batched and
    per-class maps would differ) and would update its running statistics.

    Example::

        with CAMExtractor(resnet, "layer4") as cam:
            maps = cam(image_syn, label_syn)          # (N, 4, 4) for 128 px ResNet-18
                                                      # label_syn: N class indices or EDF's (N, K) soft labels

        with CAMExtractor(resnet, ["layer1", "layer2", "layer3", "layer4"]) as cam:
            m1, m2, m3, m4 = cam(images, "predicted")  # each layer at its own resolution
    """

    def __init__(self, model: nn.Module, target_layer: Union[Layer, Sequence[Layer]], *,
                 method: str = "smoothgradcam++",
                 num_samples: int = 4, std: float = 0.3, batch_size: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0 or std == float("inf"):
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        self.model = model
        self._multi = isinstance(target_layer, (list, tuple))
        requested = list(target_layer) if self._multi else [target_layer]
        if not requested:
            raise ValueError("target_layer: give at least one layer, got an empty list")
        self.target_layers: tuple[nn.Module, ...] = tuple(self._resolve(model, t) for t in requested)
        for j, m in enumerate(self.target_layers):
            for k in range(j):
                if self.target_layers[k] is m:
                    raise ValueError(f"target_layer: {requested[j]!r} (position {j}) names the same module as "
                                     f"{requested[k]!r} (position {k})")
        self.target_layer = self.target_layers[0]
        self.method = method
        self.num_samples = num_samples
        self.std = float(std)
        self.batch_size = batch_size
        self._closed = False
        self._handles: list = []
        self._grad_mode = False  # the hooks' behaviour: False = capture only, True = capture in a graph
        self._captured: list[Optional[Tensor]] = [None] * len(self.target_layers)

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _resolve(model: nn.Module, target_layer: Layer) -> nn.Module:
        if isinstance(target_layer, str):
            try:
                return model.get_submodule(target_layer) if target_layer else model
            except AttributeError as e:
                names = [n for n, _ in model.named_modules() if n][:20]
                raise ValueError(f"target_layer {target_layer!r} is not a submodule of the model; "
                                 f"some names: {names}") from e
        if isinstance(target_layer, nn.Module):
            if not any(m is target_layer for m in model.modules()):
                raise ValueError("target_layer must be a submodule of model (or its dotted name)")
            return target_layer
        raise TypeError(f"target_layer must be an nn.Module or a dotted name, got {type(target_layer).__name__}")

    def close(self) -> None:
        """Remove any hook; later calls raise ``RuntimeError``."""
        self._remove_hook()
        self._closed = True

    def __enter__(self) -> "CAMExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method!r}, num_samples={self.num_samples}, std={self.std}, "
                f"batch_size={self.batch_size})")

    def _remove_hook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._captured = [None] * len(self.target_layers)

    def _make_hook(self, j: int):
        def hook(module: nn.Module, inputs, output):
            return self._hook(j, output)
        return hook

    def _hook(self, j: int, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"CAMExtractor: target layer must output a Tensor, got {type(output).__name__}")
        if not self._grad_mode:
            # Clean pass: keep a copy (an in-place op after the layer must not change it).
            self._captured[j] = output.detach().clone()
            return None
        if output.requires_grad:
            # A hooked layer upstream already started the graph: differentiate against this
            # (non-leaf) activation itself; the clone keeps later in-place ops off it.
            self._captured[j] = output
            return output.clone()
        # The first hooked layer of the pass: its activation becomes a leaf we differentiate
        # against. Layers before it ran without a graph; from here on the graph is built
        # (restored by the caller).
        leaf = output.detach().requires_grad_(True)
        self._captured[j] = leaf
        torch.set_grad_enabled(True)
        return leaf.clone()  # a non-leaf, so an in-place op after the layer stays legal

    # ------------------------------------------------------------------ passes

    def _forward(self, x: Tensor, grad: bool) -> tuple[Tensor, list[Tensor]]:
        """One pass: (logits, one captured activation per target layer)."""
        self._grad_mode = grad
        self._captured = [None] * len(self.target_layers)
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            out = self.model(x)
        finally:
            torch.set_grad_enabled(prev)
        acts = self._captured
        self._captured = [None] * len(self.target_layers)
        missing = [j for j, a in enumerate(acts) if a is None]
        if missing:
            which = "the target layer was" if not self._multi else f"target layer(s) at position(s) {missing} were"
            raise RuntimeError(f"CAMExtractor: {which} not called during the model's forward")
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError("CAMExtractor: the model must return logits of shape (B, K), got "
                            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out, acts

    def _grads(self, logits: Tensor, acts: list[Tensor], cls: Tensor, label_width: Optional[int]) -> list[Tensor]:
        k = logits.shape[1]
        if label_width is not None and label_width != k:
            raise ValueError(f"class_idx: soft labels (N, K) must have K = the model's {k} outputs, "
                             f"got K={label_width}")
        if int(cls.min()) < 0 or int(cls.max()) >= k:
            raise ValueError(f"class_idx must lie in [0, {k}) for a model with {k} outputs, "
                             f"got values in [{int(cls.min())}, {int(cls.max())}]")
        with torch.enable_grad():  # the caller may be under no_grad
            score = logits.gather(1, cls[:, None]).sum()  # images are independent in eval mode
        grads = torch.autograd.grad(score, acts, allow_unused=True)
        for j, g in enumerate(grads):
            if g is None:
                which = "the target layer's output" if not self._multi else f"target layer {j}'s output"
                raise RuntimeError(f"CAMExtractor: the class scores do not depend on {which}")
        return list(grads)

    def _class_tensor(self, class_idx: ClassIdx, n: int, device: torch.device) -> Optional[Tensor]:
        """The N classes to explain; ``None`` for ``"predicted"`` (resolved from each pass's logits)."""
        if isinstance(class_idx, str):
            if class_idx != "predicted":
                raise ValueError(f"class_idx as a string must be 'predicted', got {class_idx!r}")
            return None
        if isinstance(class_idx, bool):
            raise TypeError("class_idx must be an int, a sequence of ints or an integer tensor, got bool")
        if isinstance(class_idx, int):
            return torch.full((n,), class_idx, dtype=torch.long, device=device)
        if isinstance(class_idx, Tensor):
            if class_idx.is_floating_point() and class_idx.dim() == 2:
                return _soft_label_classes(class_idx, n, device)
            if class_idx.is_floating_point() or class_idx.is_complex() or class_idx.dtype == torch.bool:
                raise TypeError(f"class_idx tensor must have an integer dtype, or be (N, K) floating soft labels, "
                                f"got {class_idx.dtype} of shape {tuple(class_idx.shape)}")
            if class_idx.dim() == 0:
                return torch.full((n,), int(class_idx), dtype=torch.long, device=device)
            cls = class_idx
        elif isinstance(class_idx, (list, tuple)):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in class_idx):
                raise TypeError("class_idx sequence must hold ints")
            cls = torch.tensor(list(class_idx), dtype=torch.long)
        else:
            raise TypeError("class_idx must be an int, a sequence of ints or an integer tensor, "
                            f"got {type(class_idx).__name__}")
        if cls.dim() != 1 or cls.shape[0] != n:
            raise ValueError(f"class_idx must hold N={n} class indices (one per image), got shape {tuple(cls.shape)}")
        return cls.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ public call

    def __call__(self, images: Tensor, class_idx: ClassIdx, size: Optional[tuple[int, int]] = None, *,
                 generator: Optional[torch.Generator] = None,
                 noise: Optional[Tensor] = None) -> Union[Tensor, list[Tensor]]:
        """Maps for all N images.

        Args:
            images: ``(N, C, H, W)`` input batch (detached internally; its ``.grad`` is untouched).
            class_idx: the class to explain: one int for all images; N ints (list or integer tensor);
                an ``(N, K)`` floating tensor of soft labels, as EDF learns ``label_syn``, whose
                class is each row's argmax (``argmax(dim=-1)``, the first index on ties, as EDF's
                ``utils/gradcam.py`` takes it; ``K`` must be the model's number of outputs, and a row
                holding NaN or inf is a ``ValueError``); or ``"predicted"``: each image's argmax logit
                on the clean input (``smoothgradcam++``; the plain methods take the argmax of the one
                pass they run, also on the clean input).
            size: ``(H, W)`` to upsample the maps to (bilinear, ``align_corners=False``), e.g. the
                image size as EDF does; ``None`` keeps the layer's ``(h, w)``.
            generator: RNG for the input noise (``smoothgradcam++``); ``None`` uses torch's global RNG.
            noise: ``(num_samples, N, C, H, W)`` standard-normal draws to use instead of drawing
                (``smoothgradcam++`` only); pass ``s`` adds ``noise[s] * std`` to the images.
                :func:`torchcam_noise` builds it in the order of EDF's per-class torchcam loop.

        Returns:
            ``(N, h, w)`` (or ``(N, H, W)``) maps in ``[0, 1]``, float32 (float64 for a float64 model);
            with a list of target layers, a list of such maps, one per layer (each at its own ``(h, w)``).
        """
        if self._closed:
            raise RuntimeError("CAMExtractor is closed")
        if not isinstance(images, Tensor) or images.dim() < 2 or not images.is_floating_point():
            raise ValueError("images must be a floating tensor (N, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        n = images.shape[0]
        if n == 0:
            raise ValueError("images must hold at least one image, got N=0")
        cls = self._class_tensor(class_idx, n, images.device)
        label_width = class_idx.shape[1] if isinstance(class_idx, Tensor) and class_idx.dim() == 2 else None
        x = images.detach()
        if noise is not None:
            if self.method != "smoothgradcam++":
                raise ValueError(f"noise is only used by method='smoothgradcam++', not {self.method!r}")
            want = (self.num_samples,) + tuple(x.shape)
            if not isinstance(noise, Tensor) or tuple(noise.shape) != want:
                raise ValueError(f"noise must be a tensor of shape (num_samples, N, C, H, W) = {want}, got "
                                 f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
            if noise.dtype != x.dtype or noise.device != x.device:
                raise ValueError(f"noise must have the images' dtype and device ({x.dtype}, {x.device}), "
                                 f"got ({noise.dtype}, {noise.device})")

        modes = [(m, m.training) for m in self.model.modules()]
        self._handles = [m.register_forward_hook(self._make_hook(j)) for j, m in enumerate(self.target_layers)]
        try:
            self.model.eval()
            with torch.inference_mode(False):  # the passes need autograd even if the caller is in inference mode
                if self.method == "smoothgradcam++":
                    maps = self._smooth(x, cls, label_width, size, generator, noise)
                else:
                    maps = self._plain(x, cls, label_width, size)
            return maps if self._multi else maps[0]
        finally:
            self._remove_hook()
            for m, t in modes:
                m.training = t

    def _chunks(self, total: int):
        step = self.batch_size or total
        for r0 in range(0, total, step):
            yield r0, min(total, r0 + step)

    def _plain(self, x: Tensor, cls: Optional[Tensor], label_width: Optional[int], size) -> list[Tensor]:
        L = len(self.target_layers)
        acts: list[list[Tensor]] = [[] for _ in range(L)]
        grads: list[list[Tensor]] = [[] for _ in range(L)]
        for r0, r1 in self._chunks(x.shape[0]):
            logits, a = self._forward(x[r0:r1], grad=True)
            c = logits.detach().argmax(1) if cls is None else cls[r0:r1]
            for j, g in enumerate(self._grads(logits, a, c, label_width)):
                grads[j].append(g)
                acts[j].append(a[j].detach())
        return [grad_cam(torch.cat(acts[j]), torch.cat(grads[j]), method=self.method, size=size) for j in range(L)]

    def _smooth(self, x: Tensor, cls: Optional[Tensor], label_width: Optional[int], size,
                generator: Optional[torch.Generator], given_noise: Optional[Tensor]) -> list[Tensor]:
        n, s_count, L = x.shape[0], self.num_samples, len(self.target_layers)
        # Clean activations (alpha's denominator): forward only; its logits give "predicted".
        clean: list[list[Tensor]] = [[] for _ in range(L)]
        predicted = []
        for r0, r1 in self._chunks(n):
            logits, a = self._forward(x[r0:r1], grad=False)
            for j in range(L):
                clean[j].append(a[j])
            if cls is None:
                predicted.append(logits.argmax(1))
        a_clean = [torch.cat(c) for c in clean]
        if cls is None:
            cls = torch.cat(predicted)

        A = [a.new_empty((s_count,) + tuple(a.shape)) for a in a_clean]
        G = [torch.empty_like(t) for t in A]
        noise: dict[int, Tensor] = {}

        def noise_for(s: int) -> Tensor:  # drawn in pass order, one (N, C, H, W) draw per pass
            if given_noise is not None:
                return given_noise[s] * self.std
            if s not in noise:
                for old in [k for k in noise if k < s]:
                    del noise[old]
                noise[s] = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device).mul_(self.std)
            return noise[s]

        # Noisy rows, pass-major: row r is image r % N of pass r // N.
        for r0, r1 in self._chunks(s_count * n):
            pieces, spans = [], []
            r = r0
            while r < r1:
                s, i0 = divmod(r, n)
                i1 = min(n, i0 + (r1 - r))
                pieces.append(x[i0:i1] + noise_for(s)[i0:i1])
                spans.append((s, i0, i1))
                r += i1 - i0
            batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            rows_cls = torch.cat([cls[i0:i1] for _, i0, i1 in spans])
            logits, a = self._forward(batch, grad=True)
            g = self._grads(logits, a, rows_cls, label_width)
            for j in range(L):
                off = 0
                for s, i0, i1 in spans:
                    A[j][s, i0:i1] = a[j].detach()[off:off + i1 - i0]
                    G[j][s, i0:i1] = g[j][off:off + i1 - i0]
                    off += i1 - i0
        return [grad_cam(A[j], G[j], method="smoothgradcam++", size=size, clean_activations=a_clean[j])
                for j in range(L)]


# ---------------------------------------------------------------------- EDF's label and noise conventions


def _soft_label_classes(labels: Tensor, n: int, device: torch.device) -> Tensor:
    """The classes of ``(N, K)`` soft labels: ``labels.argmax(dim=-1)``, as EDF's ``utils/gradcam.py``.

    ``argmax`` returns the first index among equal maxima. A row holding NaN or inf has no
    meaningful argmax (``torch.argmax`` would pick the NaN), so it is refused, naming the row.
    """
    if labels.shape[0] != n or labels.shape[1] == 0:
        raise ValueError(f"class_idx: soft labels must have shape (N={n}, K) with K >= 1, one row per image, "
                         f"got {tuple(labels.shape)}")
    lab = labels.detach()
    bad = ~torch.isfinite(lab).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(str(r) for r in rows[:5]) + (f", ... ({len(rows)} rows)" if len(rows) > 5 else "")
        raise ValueError(f"class_idx: soft label row {rows[0]} is not finite (it holds NaN or inf), so it has no "
                         f"class to explain; non-finite rows: {shown}")
    return lab.argmax(dim=-1).to(device=device, dtype=torch.long)


def _edf_loader_batch(ipc: int) -> int:
    """The batch size of EDF's per-class ``DataLoader`` in ``get_activation_maps``."""
    return ipc if ipc <= 50 else 32


def torchcam_noise(shape: Sequence[int], ipc: int, *, num_samples: int = 4, loader_batch_size: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None,
                   device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """The noise of EDF's per-class torchcam loop, in the layout ``CAMExtractor(noise=)`` takes.

    EDF's ``get_activation_maps`` (``utils/gradcam.py``) runs, for each class ``c`` in turn, over
    a ``DataLoader(TensorDataset(...), batch_size=b, shuffle=False)`` of that class's IPC images,
    with ``b = ipc`` for ``ipc <= 50`` and ``32`` above. Each class draws from torch's global CPU
    RNG, in this order:

    1. ``iter(data_loader)``: one ``int64`` draw, the loader's base seed
       (``torch.empty((), dtype=torch.int64).random_()``), although no worker uses it;
    2. for each loader batch of ``b' <= b`` images, torchcam 0.4's ``SmoothGradCAMpp`` makes
       ``num_samples`` draws of shape ``(b', C, H, W)`` (``Normal(0, std).sample``, on the CPU in
       the default dtype, even for CUDA images), one per noisy pass.

    This function makes the same draws from ``generator`` and returns them as standard-normal
    ``(num_samples, N, C, H, W)`` noise: ``noise[s]`` holds pass ``s`` of every batch, at the
    batch's rows. ``CAMExtractor(...)(images, label_syn, noise=noise)`` then adds exactly
    torchcam's noise (``noise[s] * std``) and returns EDF's maps (before its resize) draw for draw.

    The state to start from is the global RNG's state where EDF's per-class loop begins: after
    ``get_activation_maps`` has built the CAM model (building a network draws its initial weights).

    Args:
        shape: ``(N, C, H, W)``, the synthetic images' shape; class-contiguous, ``N = K * ipc``.
        ipc: images per class.
        num_samples: torchcam's ``num_samples`` (EDF uses the default, 4).
        loader_batch_size: the per-class loader's batch size; ``None``: EDF's rule above.
        generator: a CPU ``torch.Generator`` holding the RNG state; ``None`` draws from (and
            advances) torch's global CPU RNG, as EDF's loop does.
        dtype: the returned dtype (give the images' dtype); the draws are made in torch's default
            dtype, as torchcam makes them, and then converted. ``None``: the default dtype.
        device: the returned tensor's device (give the images' device). The draws are on the CPU.

    Returns:
        ``(num_samples, N, C, H, W)`` standard-normal noise.
    """
    if isinstance(shape, torch.Size) or isinstance(shape, (list, tuple)):
        shape = tuple(shape)
    else:
        raise TypeError(f"shape must be a tuple (N, C, H, W) such as images.shape, got {type(shape).__name__}")
    if len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"shape must be (N, C, H, W) with positive ints, got {shape}")
    for name, v in (("ipc", ipc), ("num_samples", num_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if loader_batch_size is None:
        loader_batch_size = _edf_loader_batch(ipc)
    elif isinstance(loader_batch_size, bool) or not isinstance(loader_batch_size, int) or loader_batch_size < 1:
        raise ValueError(f"loader_batch_size must be None or an int >= 1, got {loader_batch_size!r}")
    n, c, h, w = shape
    if n % ipc:
        raise ValueError(f"shape: N={n} images must be K classes of ipc={ipc} images each (N divisible by ipc)")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise TypeError("generator must be None or a CPU torch.Generator (torchcam draws its noise on the CPU), "
                        f"got {generator.device if isinstance(generator, torch.Generator) else type(generator).__name__}")
    draw_dtype = torch.get_default_dtype()
    noise = torch.empty((num_samples, n, c, h, w), dtype=draw_dtype)
    for c0 in range(0, n, ipc):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # iter(DataLoader): its base seed
        for r0 in range(c0, c0 + ipc, loader_batch_size):
            r1 = min(c0 + ipc, r0 + loader_batch_size)
            for s in range(num_samples):
                noise[s, r0:r1] = torch.randn((r1 - r0, c, h, w), generator=generator, dtype=draw_dtype)
    return noise.to(dtype=dtype or draw_dtype, device=device)
