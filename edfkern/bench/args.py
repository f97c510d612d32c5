"""Argument checks of ``python -m edfkern.bench`` (per-op tables and ``--step`` alike).

One rule: every argument is checked before any work starts, and a bad one ends the process
with exit code 2 and exactly one line on stderr that names the argument and says what was expected::

    python -m edfkern.bench: error: argument --scale: expected a finite number > 0, got 'nan'

That covers argparse's own errors (unknown flags, values of the wrong type: :class:`Parser`), number
ranges (the ``type=`` factories below), comma-separated names (:func:`names`), sweeps
(:func:`sweep`), the device (:func:`device`) and output files (:func:`output_path`: the directory
exists and takes a new file, checked by creating and removing one, so it holds for root too).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Callable, NoReturn, Optional, Sequence

import torch

__all__ = ["Parser", "fail", "int_in", "positive_float", "threads", "SEED", "TIMEOUT_MAX_S", "names", "sweep",
           "device", "output_path", "plot_path"]

#: the largest --timeout: the child's pipe is polled with it, and select() refuses more than ~2.1e6 s
TIMEOUT_MAX_S = 1e6
SEED_MAX = 2 ** 32 - 1


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def fail(parser: argparse.ArgumentParser, arg: str, msg: str) -> NoReturn:
    """Exit 2 with ``argument ARG: MSG`` on one line."""
    parser.error(f"argument {arg}: {msg}")


# ----------------------------------------------------------------------------- numbers (argparse types)


def int_in(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""
    want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v

    return parse


def positive_float(hi: Optional[float] = None, unit: str = "") -> Callable[[str], float]:
    """An argparse ``type``: a finite float ``> 0`` (and ``<= hi`` when given)."""
    want = "a finite number > 0" + (f" and <= {hi:g}" if hi is not None else "") + (f" ({unit})" if unit else "")

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        if not (math.isfinite(v) and v > 0) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v

    return parse


def threads(s: str) -> int:
    """An argparse ``type`` for ``--threads``: 1 up to 4x the logical CPUs (more only oversubscribes)."""
    cap = 4 * (os.cpu_count() or 1)
    return int_in(1, cap)(s)


SEED = int_in(0, SEED_MAX)
SEED.__doc__ = "An argparse ``type`` for ``--seed``: 0 .. 2**32 - 1 (seeds are offset and multiplied inside)."


# ----------------------------------------------------------------------------- names and sweeps


def names(parser: argparse.ArgumentParser, arg: str, value: str, known: Sequence[str]) -> list[str]:
    """``value`` = comma-separated names, each in ``known`` -> the names (spaces stripped, duplicates dropped).

    An empty value, an empty entry (``a,,b``) or an unknown name is an ``arg`` error.
    """
    items = [x.strip() for x in value.split(",")]
    if not value.strip() or not all(items):
        fail(parser, arg, f"expected a comma-separated list of {', '.join(known)} with no empty entry, "
                          f"got {value!r}")
    bad = [x for x in items if x not in known]
    if bad:
        fail(parser, arg, f"unknown {', '.join(map(repr, bad))}; expected some of {', '.join(known)}")
    return list(dict.fromkeys(items))


def sweep(parser: argparse.ArgumentParser, value: str, keys: Sequence[str]) -> tuple[str, list[int]]:
    """``KEY=V1,V2,...`` with ``KEY`` in ``keys`` and every value an integer >= 1 -> (KEY, sorted values)."""
    key, sep, vals = value.partition("=")
    form = " or ".join(f"{k}=V1,V2,..." for k in keys)
    if not sep or key.strip() not in keys:
        fail(parser, "--sweep", f"expected {form}, got {value!r}")
    out = []
    for v in vals.split(","):
        try:
            out.append(int(v.strip()))
        except ValueError:
            fail(parser, "--sweep", f"{key.strip()} values must be integers >= 1 separated by commas, got {value!r}")
    bad = [v for v in out if v < 1]
    if bad:
        fail(parser, "--sweep", f"{key.strip()} values must be >= 1, got {bad}")
    return key.strip(), sorted(set(out))


# ----------------------------------------------------------------------------- device and output files


def device(parser: argparse.ArgumentParser, value: str) -> str:
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N`` of a device torch sees -> the device."""
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return value
    try:
        d = torch.device(value)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type != "cuda":
        fail(parser, "--device", f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    if not torch.cuda.is_available():
        fail(parser, "--device", f"{value!r}, but torch sees no CUDA device")
    if d.index is not None and d.index >= torch.cuda.device_count():
        fail(parser, "--device", f"{value!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return value


def output_path(parser: argparse.ArgumentParser, arg: str, path: str) -> str:
    """Check that ``path`` can be written (before the run, so a long run never ends in a traceback).

    An existing regular file (or device, e.g. /dev/null) must open for appending, which leaves it as it is;
    a new file's directory must exist and take a file (one is created and removed). Returns ``path``.
    """
    if not path:
        fail(parser, arg, "expected a file path, got ''")
    if os.path.isdir(path):
        fail(parser, arg, f"{path!r} is a directory; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        fail(parser, arg, f"cannot write {path!r}: {parent!r} {what}")
    try:
        if os.path.exists(path):
            with open(path, "a"):
                pass
        else:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".edfkern-write-check-")
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        fail(parser, arg, f"cannot write {path!r}: {e.strerror or e}")
    return path


def plot_path(parser: argparse.ArgumentParser, path: str, *, other: Optional[str] = None) -> str:
    """``--plot``: matplotlib importable, a file name whose extension matplotlib writes, writable, and not
    the same file as ``other`` (the ``--json`` path)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        fail(parser, "--plot", "needs matplotlib, which is not installed: pip install matplotlib "
                               "(or pip install 'edfkern[bench]')")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in formats:
        fail(parser, "--plot", f"expected a file name ending in one of .{', .'.join(formats)}, got {path!r}")
    if other and os.path.realpath(other) == os.path.realpath(path):
        fail(parser, "--plot", f"{path!r} is also the --json file; give two different paths")
    return output_path(parser, "--plot", path)
