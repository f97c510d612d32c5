"""What Comp-DD scoring reads from and writes to disk, checked before the first image is scored.

* Reading: :func:`load_torch` and :func:`load_npz` turn every way a file can be unreadable (missing,
  a folder, empty, truncated, not a torch/numpy file, a pickle of foreign classes) into one
  ``ValueError`` line naming the argument and the path, instead of ``EOFError``,
  ``UnpicklingError``, ``BadZipFile`` or ``PytorchStreamReader`` tracebacks.
* Writing: :func:`check_output` (the path is not a folder and its folder takes a new file) and
  :func:`check_space` (enough free bytes; :func:`free_bytes` is the one place that asks the OS,
  so a test can stand in a full disk).
* The maps file of ``save_maps``: :func:`create_maps` reserves all its bytes with
  ``posix_fallocate`` before the first write, so a full disk is an error up front instead of
  a ``SIGBUS`` from the sparse memory map halfway through the run.
* Checkpoints: :func:`save_checkpoint` (atomic) and :func:`load_checkpoint`, which checks the
  format and the content and refuses a checkpoint of another configuration or dataset, saying
  what differs, on one line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["PathLike", "error_line", "free_bytes", "check_space", "check_writes", "check_output", "load_torch",
           "load_npz", "maps_layout", "maps_bytes", "create_maps", "open_maps", "load_maps", "rank_path",
           "CKPT_VERSION", "checkpoint_bytes", "save_checkpoint", "load_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]

#: Version 2 added the dataset fingerprint, the tags and the non-finite images to version 1.
CKPT_VERSION = 2
#: Free bytes kept on top of what a run is known to write (results, temporary checkpoint copies).
SLACK = 1 << 20


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (some of torch's span ten lines), with its type."""
    text = str(e).strip().splitlines()
    first = text[0].strip() if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _size(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # unreachable


# ----------------------------------------------------------------------------- reading


def _check_input_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder, expected a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes)")


def load_torch(path: PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is one ``ValueError`` line."""
    path = os.fspath(path)
    _check_input_file(path, what)
    with warnings.catch_warnings(record=True) as caught:  # torch warns about some files it then refuses
        warnings.simplefilter("always")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (torch raises many types here, each means "not readable")
            raise ValueError(f"{what} {path} is not a readable torch file (truncated, or written by something "
                             f"else?): {error_line(e)}") from None
    for w in caught:  # a file that loads keeps its warnings
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def load_npz(path: PathLike, what: str, keys: Sequence[str]) -> dict[str, Any]:
    """The arrays ``keys`` of an ``.npz`` archive (no pickles), read fully; any failure is one ``ValueError``."""
    import numpy as np

    path = os.fspath(path)
    _check_input_file(path, what)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{what} {path} is not a readable .npz archive (truncated, or written by something "
                         f"else?): {error_line(e)}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} holds a single array, not an .npz archive of arrays {list(keys)}")
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"{what} {path}: an .npz needs arrays {', '.join(map(repr, keys))}, has {z.files}")
        try:
            return {k: z[k] for k in keys}
        except Exception as e:  # noqa: BLE001  (a damaged member: CRC, zlib, header errors)
            raise ValueError(f"{what} {path}: cannot read its arrays (damaged archive?): {error_line(e)}") from None


# ----------------------------------------------------------------------------- writing


def free_bytes(folder: PathLike) -> int:
    """Free bytes for an unprivileged writer on ``folder``'s filesystem (``shutil.disk_usage``)."""
    return shutil.disk_usage(folder).free


def check_space(folder: PathLike, need: int, what: str) -> None:
    """``ValueError`` unless ``folder``'s filesystem has ``need + SLACK`` bytes free."""
    free = free_bytes(folder)
    if free < need + SLACK:
        raise ValueError(f"{what}: {folder} has {_size(free)} free, the run needs about {_size(need + SLACK)}")


def check_writes(writes: Sequence[tuple[str, int, str]]) -> None:
    """:func:`check_space` for ``(path, bytes, what)`` writes, summed per filesystem (device)."""
    by_device: dict[int, list] = {}
    for path, nbytes, what in writes:
        folder = os.path.dirname(os.path.abspath(path))
        entry = by_device.setdefault(os.stat(folder).st_dev, [folder, 0, []])
        entry[1] += nbytes
        entry[2].append(what)
    for folder, nbytes, whats in by_device.values():
        check_space(folder, nbytes, " and ".join(whats))


def check_output(path: PathLike, what: str) -> None:
    """``path`` can be written: it is not a folder, its folder exists, and a new file there takes a byte.

    The probe file is created, written, synced and removed, so a read-only filesystem, missing
    permissions and a disk too full for one block are all found here, not at the first write.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder; it must name a file")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: its folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".compdd-write-check-", dir=folder)
    except OSError as e:
        raise ValueError(f"{what}: cannot create files in {folder}: {e.strerror or error_line(e)}") from None
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {folder}: {e.strerror or error_line(e)}") from None
    finally:
        os.close(fd)
        os.unlink(probe)


# ----------------------------------------------------------------------------- the maps file


def maps_layout(names: list[str], shapes: list[tuple[int, int]]) -> dict:
    """Where each layer's ``h*w`` map sits in a row of the maps file."""
    offsets, off = [], 0
    for h, w in shapes:
        offsets.append(off)
        off += h * w
    return {"layers": names, "shapes": [list(s) for s in shapes], "offsets": offsets, "pixels": off}


def maps_bytes(n: int, layout: dict) -> int:
    """Bytes of the ``(n, pixels)`` float32 maps file, its ``.npy`` header and its layout ``.json``."""
    return 4 * n * layout["pixels"] + 4096


def _reserve(path: str) -> None:
    """Allocate every byte of ``path`` now (``posix_fallocate``), so writes through a memory map cannot
    meet a full disk (which the kernel reports as ``SIGBUS``)."""
    if not hasattr(os, "posix_fallocate"):  # not on macOS/Windows: the free-space check stands alone
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return  # this filesystem cannot reserve: the free-space check stands alone
        raise ValueError(f"save_maps: cannot reserve {_size(size)} for {path}: {e.strerror or error_line(e)}") from None
    finally:
        os.close(fd)


def create_maps(path: PathLike, n: int, layout: dict) -> None:
    """Create the ``(n, pixels)`` float32 maps file, all NaN, its bytes reserved first, and its layout json."""
    from numpy.lib.format import open_memmap

    path = os.fspath(path)
    try:
        arr = open_memmap(path, mode="w+", dtype="float32", shape=(n, layout["pixels"]))
    except OSError as e:
        raise ValueError(f"save_maps: cannot create {path}: {e.strerror or error_line(e)}") from None
    try:
        _reserve(path)
    except ValueError:
        del arr
        os.remove(path)
        raise
    arr[:] = float("nan")
    arr.flush()
    del arr
    with open(f"{path}.json", "w") as f:
        json.dump(layout, f)


def open_maps(path: PathLike, n: int, layout: dict, *, reserve: bool = False):
    """The maps file for writing (a memmap ``(n, pixels)``); checks that it is whole and of this run's shape."""
    import numpy as np
    from numpy.lib.format import open_memmap

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"save_maps: resuming writes into the interrupted run's maps file, but {path} "
                                "does not exist")
    _check_input_file(path, "save_maps: the maps file")
    fmt = np.lib.format
    try:  # the header first: numpy's r+ memmap would silently extend a truncated file
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            shape, fortran, dtype = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(f)
            offset = f.tell()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"save_maps: {path} is not a readable .npy maps file: {error_line(e)}") from None
    want = (n, layout["pixels"])
    if shape != want or dtype != np.float32 or fortran:
        raise ValueError(f"save_maps file {path} holds {dtype} {shape}, expected float32 {want}")
    if os.path.getsize(path) < offset + 4 * n * layout["pixels"]:
        raise ValueError(f"save_maps file {path} is truncated: {os.path.getsize(path)} bytes, its header says "
                         f"{offset + 4 * n * layout['pixels']}")
    arr = open_memmap(path, mode="r+")
    if reserve:
        _reserve(path)  # a file copied sparse, or written before reservation existed
    return arr


def load_maps(path: PathLike) -> dict[str, Any]:
    """The maps :func:`edfkern.compdd.score` saved with ``save_maps=path``: ``{layer: (n, h, w) read-only
    memmap}``. Row ``i`` is dataset image ``i``; rows of images not scored (a partial run, a non-finite
    image) are NaN."""
    import numpy as np

    with open(f"{path}.json") as f:
        layout = json.load(f)
    arr = np.load(path, mmap_mode="r")
    return {name: arr[:, off:off + h * w].reshape(arr.shape[0], h, w)
            for name, (h, w), off in zip(layout["layers"], layout["shapes"], layout["offsets"])}


# ----------------------------------------------------------------------------- checkpoints


def rank_path(path: PathLike, rank: int, size: int) -> str:
    """``path`` itself for one process; ``<root>.rank<r>-of-<W><ext>`` for rank ``r`` of ``W``."""
    path = os.fspath(path)
    if size == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}-of-{size}{ext}"


def checkpoint_bytes(k: int, num_layers: int, num_nonfinite: int) -> int:
    """About what one checkpoint takes on disk, twice (the temporary copy beside the previous one)."""
    return 2 * (8 * k * (num_layers + 1) + 8 * num_nonfinite + (64 << 10))


def save_checkpoint(path: str, config: dict, done: int, sums: Tensor, counts: Tensor, nonfinite: list[int]) -> None:
    """Write the running state atomically (a crash mid-save leaves the previous checkpoint)."""
    tmp = f"{path}.tmp"
    state = {"version": CKPT_VERSION, "config": config, "done": done, "sums": sums.cpu(), "counts": counts.cpu(),
             "nonfinite": torch.tensor(nonfinite, dtype=torch.long)}
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise OSError(f"checkpoint: cannot write {path}: {error_line(e)}") from None


def _show(v: Any) -> str:
    return repr(v) if not isinstance(v, list) or len(v) <= 12 else f"[{len(v)} values]"


def _difference(key: str, old: Any, new: Any) -> str:
    if key == "label_counts" and isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        at = [c for c in range(len(old)) if old[c] != new[c]]
        first = ", ".join(f"class {c}: {old[c]} then {new[c]}" for c in at[:3])
        return f"label_counts (images per class) differ at {len(at)} classes ({first}{', ...' if len(at) > 3 else ''})"
    return f"{key}: checkpoint {_show(old)}, this call {_show(new)}"


def load_checkpoint(path: str, config: dict, *, num_classes: int, num_layers: int, todo: int,
                    n: int) -> dict:
    """The checkpoint at ``path`` if it was written for ``config``; else one ``ValueError`` line saying why.

    Checks the format (an edfkern.compdd checkpoint of this version), every entry of the
    configuration (model, layers, options, tags and the dataset fingerprint), and the content
    (``sums (K, L)``, ``counts (K,)``, ``0 <= done <= todo``, non-finite indices in ``[0, n)``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    ck = load_torch(path, "resume: checkpoint")
    if not isinstance(ck, dict) or "version" not in ck or "config" not in ck:
        raise ValueError(f"resume: {path} is not an edfkern.compdd checkpoint")
    if ck["version"] != CKPT_VERSION:
        raise ValueError(f"resume: {path} is a version {ck['version']!r} checkpoint; this edfkern reads version "
                         f"{CKPT_VERSION}, which also records the dataset's fingerprint: start again without resume")
    old = ck["config"] if isinstance(ck["config"], dict) else {}
    diff = [_difference(k, old.get(k), v) for k, v in config.items() if old.get(k) != v]
    diff += [f"{k}: checkpoint {_show(old[k])}, this call has none" for k in old if k not in config]
    if diff:
        hint = ""
        if [k for k in config if old.get(k) != config[k]] == ["images_sha256"]:
            hint = (" (size and labels agree but the sampled images differ: other images, or random transforms, "
                    "for which the API takes fingerprint_images=0)")
        raise ValueError(f"resume: checkpoint {path} was written by another configuration or dataset; "
                         + "; ".join(diff) + hint)
    sums, counts, done, bad = ck.get("sums"), ck.get("counts"), ck.get("done"), ck.get("nonfinite")
    problems = []
    if not isinstance(sums, Tensor) or tuple(sums.shape) != (num_classes, num_layers) or not sums.is_floating_point():
        problems.append(f"sums must be a float ({num_classes}, {num_layers}) tensor")
    if not isinstance(counts, Tensor) or tuple(counts.shape) != (num_classes,) or counts.dtype != torch.long:
        problems.append(f"counts must be an int64 ({num_classes},) tensor")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= todo:
        problems.append(f"done must be an int in [0, {todo}], got {done!r}")
    if not isinstance(bad, Tensor) or bad.dim() != 1 or bad.dtype != torch.long or \
            (bad.numel() and (int(bad.min()) < 0 or int(bad.max()) >= n)):
        problems.append(f"nonfinite must be int64 indices in [0, {n})")
    if problems:
        raise ValueError(f"resume: checkpoint {path} is damaged: " + "; ".join(problems))
    return ck
