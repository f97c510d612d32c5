"""Render a ``python -m edfkern.bench --json`` file as Markdown tables (for benchmarks/RESULTS.md).

    python -m edfkern.bench.markdown run.json > tables.md

Adds, per op, the floor the cost model predicts (``max(bytes / copy, FLOPs / matmul)``
with the run's measured ceilings) and the speedup over the baseline that floor allows.
"""
from __future__ import annotations

import json
import sys

from .ceilings import Ceilings
from .report import MODE_ORDER, _default_for, _porder, fmt_bytes, fmt_time


def render(data: dict) -> str:
    meta, results = data["meta"], data["results"]
    c = meta["ceilings"]
    ceil = Ceilings(c["copy_Bps"], c["matmul_flops"], c["copy_bytes"], c["matmul_n"],
                    at_size={int(k): v for k, v in (c.get("at_size") or {}).items()})
    out = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['date']}; "
           f"ceilings: copy {ceil.copy_Bps / 1e9:.1f} GB/s, fp32 matmul {ceil.matmul_flops / 1e9:.1f} GFLOP/s; "
           f"wall {meta['wall_s']:.0f} s", ""]
    ops = list(dict.fromkeys(r["op"] for r in results))
    for op in ops:
        rs = [r for r in results if r["op"] == op]
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            continue
        f = ok[0]
        scale = f" (scaled x{f['effective_scale']:g})" if f.get("effective_scale", 1.0) != 1.0 else ""
        out.append(f"**{op}** @ {f['config']} IPC {f['ipc']}, N={f['N']}{scale}: {f.get('shapes', '')}")
        out.append("")
        out.append("| mode | provider | median | p20 | p80 | speedup | vs compiled | workspace | footprint | achieved "
                   "| of ceiling | floor (model) | floor speedup |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = {r["mode"]: r["median"] for r in ok if r["provider"] == "baseline"}
        for r in sorted(rs, key=lambda r: (MODE_ORDER.index(r["mode"]), _porder(r["provider"]))):
            name = r["provider"] + (" (default)" if r["provider"] == _default_for(meta.get("default_provider"), op)
                                    else "")
            if r["status"] != "ok":
                out.append(f"| {r['mode']} | {name} | {r['status']}: {r.get('reason', '')} ||||||||||||")
                continue
            m = r.get("memory") or {}
            floor = ceil.floor_s(r["bytes_moved"], r["flops"])
            pct = min(r["of_ceiling"], 1.0)
            ach = (f"{r['achieved_Bps'] / 1e9:.1f} GB/s" if r.get("bound") == "memory"
                   else f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s")
            fs = f"{base[r['mode']] / floor:.0f}x" if r["mode"] in base else "-"
            sp = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
            vc = "-" if r.get("vs_compiled") is None else f"{r['vs_compiled']:.2f}x"
            out.append(f"| {r['mode']} | {name} | {fmt_time(r['median'])} | {fmt_time(r['q20'])} | "
                       f"{fmt_time(r['q80'])} | {sp} | {vc} | {fmt_bytes(m.get('workspace'))} | "
                       f"{fmt_bytes(m.get('footprint'))} | {ach} | {100 * pct:.0f}% | {fmt_time(floor)} | "
                       f"{fs} |")
        out.append("")
    if meta.get("targets"):
        out.append("| docs/benchmarks.md target | measured | verdict |")
        out.append("|---|---|---|")
        for t in meta["targets"]:
            out.append(f"| {t['target']} | {t['measured']} | {t['verdict']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        print(render(json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
