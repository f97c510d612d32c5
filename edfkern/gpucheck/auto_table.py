"""Turn bench JSON (``python -m edfkern.bench --json``) into the ``AUTO_CUDA`` table of edfkern/_dispatch.py.

For every backend kernel the benchmarks time, the faster of ``triton`` and ``native`` on CUDA
goes first: the geometric mean, over every (config, case) that timed both, of the ratio of
their median times decides. Which bench op and mode time which kernel:

    op (mode)                                  kernel
    dae_ (fwd)                                 dae_
    dae_sgd_step_ (fwd)                        dae_sgd_step_
    grad_cam (fwd)                             grad_cam
    cpd_trajectory_loss (fwd / bwd)            cpd_forward / cpd_backward
    local_covariance, covariance_matching_loss (fwd / bwd)    cov_forward / cov_backward
    class_centralization_loss (fwd / bwd)      cc_forward / cc_backward
    mean_matching_loss (fwd)                   seg_mean

``bwd`` falls back to ``full - fwd`` when a run has no ``bwd`` rows. Kernels no benchmark
times (``dae_mask``, ``cpd_keep_mask``) stay on the default order.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Iterable, Optional

KERNELS: dict[tuple[str, str], str] = {
    ("dae_", "fwd"): "dae_",
    ("dae_sgd_step_", "fwd"): "dae_sgd_step_",
    ("grad_cam", "fwd"): "grad_cam",
    ("cpd_trajectory_loss", "fwd"): "cpd_forward",
    ("cpd_trajectory_loss", "bwd"): "cpd_backward",
    ("local_covariance", "fwd"): "cov_forward",
    ("local_covariance", "bwd"): "cov_backward",
    ("covariance_matching_loss", "fwd"): "cov_forward",
    ("covariance_matching_loss", "bwd"): "cov_backward",
    ("class_centralization_loss", "fwd"): "cc_forward",
    ("class_centralization_loss", "bwd"): "cc_backward",
    ("mean_matching_loss", "fwd"): "seg_mean",
}
CANDIDATES = ("triton", "native")


def _medians(results: Iterable[dict]) -> dict[tuple[str, str, str, str], float]:
    """{(config, op, mode, provider): median seconds} over ok rows, with bwd = full - fwd where missing."""
    med: dict[tuple[str, str, str, str], float] = {}
    for r in results:
        if r.get("status", "ok") != "ok" or r.get("median") is None or r.get("device", "cuda") != "cuda":
            continue
        med[(r.get("config", "?"), r["op"], r["mode"], r["provider"])] = float(r["median"])
    for (cfg, op, mode, prov), t in list(med.items()):
        if mode == "full" and (cfg, op, "bwd", prov) not in med and (cfg, op, "fwd", prov) in med:
            d = t - med[(cfg, op, "fwd", prov)]
            if d > 0:
                med[(cfg, op, "bwd", prov)] = d
    return med


def auto_table(results: Iterable[dict]) -> dict[str, dict]:
    """{kernel: {"order": (fast, slow, "reference"), "ratio": triton/native geo-mean, "cases": n}}."""
    med = _medians(results)
    logs: dict[str, list[float]] = defaultdict(list)
    for (cfg, op, mode, prov), t in med.items():
        kern = KERNELS.get((op, mode))
        if kern is None or prov != "triton":
            continue
        tn = med.get((cfg, op, mode, "native"))
        if tn and t > 0:
            logs[kern].append(math.log(t / tn))
    out = {}
    for kern in sorted(logs):
        ratio = math.exp(sum(logs[kern]) / len(logs[kern]))
        order = ("triton", "native", "reference") if ratio <= 1.0 else ("native", "triton", "reference")
        out[kern] = {"order": order, "ratio": ratio, "cases": len(logs[kern])}
    return out


def format_table(table: dict[str, dict], sources: Optional[list[str]] = None) -> str:
    """The dict literal to paste into edfkern/_dispatch.py, one commented line per kernel."""
    lines = []
    if sources:
        lines.append(f"# measured: {', '.join(sources)}")
    lines.append("AUTO_CUDA: dict[str, tuple[str, ...]] = {")
    for kern, v in table.items():
        lines.append(f"    {kern!r}: {v['order']!r},  # triton/native time {v['ratio']:.2f} over {v['cases']} case(s)")
    lines.append("}")
    return "\n".join(lines)


def load_results(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as fh:
            d = json.load(fh)
        dev = (d.get("meta") or {}).get("device", "cuda")
        for r in d.get("results", []):
            rows.append(dict(r, device=r.get("device", dev)))
    return rows


def main(paths: list[str]) -> int:
    table = auto_table(load_results(paths))
    if not table:
        print("auto-table: no case timed both triton and native on CUDA in these files; the table stays as it is")
        return 1
    print(format_table(table, paths))
    return 0
