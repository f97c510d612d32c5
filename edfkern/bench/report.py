"""Tables (rich if installed, else plain text), JSON and plots of both command-line modes.

:func:`print_table` and :func:`plot_panels` render every table and plot; the per-op tables and
sweep plot (:func:`print_tables`, :func:`plot_sweep`) and the ``--step`` ones (built in
:mod:`.steps`) only say what goes in them."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

from . import ceilings as _ceilings
from .ceilings import Ceilings

__all__ = ["add_derived", "print_table", "print_tables", "print_lines", "targets", "write_json", "Series", "Panel",
           "plot_panels", "plot_sweep", "fmt_time", "fmt_bytes"]

PROVIDER_ORDER = ("baseline", "reference", "triton", "native", "compiled")
MODE_ORDER = ("fwd", "bwd", "full")


def _porder(p: str) -> int:
    return PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _key(r: dict) -> tuple:
    return (r["op"], r["mode"], r["config"], r.get("ipc"), r.get("effective_scale"))


def fmt_time(s: Optional[float]) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    mb = b / 2 ** 20
    return f"{mb:.1f} MB" if mb < 10_000 else f"{mb / 1024:.2f} GB"


# ----------------------------------------------------------------------------- derived figures


def add_derived(results: list[dict], ceilings: Optional[Ceilings]) -> None:
    """Add to every ok result: ``speedup`` (baseline median / its median), ``vs_compiled``
    (compiled median / its median) and, with ``ceilings``, the achieved rate against the ceiling
    (:func:`edfkern.bench.ceilings.apply`; the CLI then applies :func:`~edfkern.bench.ceilings.settle`)."""
    ok = [r for r in results if r["status"] == "ok"]
    base = {_key(r): r["median"] for r in ok if r["provider"] == "baseline"}
    comp = {_key(r): r["median"] for r in ok if r["provider"] == "compiled"}
    for r in ok:
        b, c = base.get(_key(r)), comp.get(_key(r))
        r["speedup"] = b / r["median"] if b else None
        r["vs_compiled"] = c / r["median"] if c else None
    if ceilings is not None:
        _ceilings.apply(results, ceilings)


DefaultProviders = Union[Mapping[str, Optional[str]], str, None]


def _default_for(default_provider: DefaultProviders, op: str) -> Optional[str]:
    """The provider ``auto`` picks for ``op``: a per-op mapping, or one name for every op."""
    if isinstance(default_provider, Mapping):
        return default_provider.get(op)
    return default_provider


def _achieved(r: dict) -> str:
    if r.get("bound") is None:
        return "-"
    if r["bound"] == "memory":
        return f"{r['achieved_Bps'] / 1e9:.1f} GB/s"
    return f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s"


# ----------------------------------------------------------------------------- tables


def _console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=sys.stdout, width=max(120, _term_width()), soft_wrap=False)


def _term_width() -> int:
    import shutil
    return shutil.get_terminal_size((140, 40)).columns


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)


def _pct(r: dict) -> str:
    oc = r.get("of_ceiling")
    if oc is None:
        return "-"
    return f"{100 * min(oc, 1.0):.1f}%" + (" est" if r.get("ceiling_source") == "achieved" else "")


def _rows(results: list[dict], default_provider: Optional[str], sweep: bool
          ) -> tuple[list[str], list[list[str]], list[str]]:
    """(columns, rows, notes): a skipped or failed case gets a short row and a note with the reason."""
    cols = (["IPC"] if sweep else []) + ["mode", "provider", "median", "p20", "p80", "speedup", "vs compiled",
                                         "workspace", "footprint", "achieved", "of ceiling"]
    rows, notes = [], []
    rs = sorted(results, key=lambda r: (r.get("ipc") or 0, MODE_ORDER.index(r["mode"]) if r["mode"] in MODE_ORDER
                                        else 9, _porder(r["provider"])))
    for r in rs:
        name = r["provider"] + ("*" if r["provider"] == default_provider else "")
        lead = ([str(r.get("ipc"))] if sweep else []) + [r["mode"], name]
        if r["status"] != "ok":
            note = f"{r['provider']} {r['mode']}: {r['status']}: {r.get('reason', '')}"
            if note not in notes:
                notes.append(note)
            rows.append(lead + [r["status"]] + ["-"] * (len(cols) - len(lead) - 1))
            continue
        mem = r.get("memory") or {}
        sp, vc = r.get("speedup"), r.get("vs_compiled")
        rows.append(lead + [
            fmt_time(r["median"]), fmt_time(r["q20"]), fmt_time(r["q80"]),
            f"{sp:.2f}x" if sp else "-", f"{vc:.2f}x" if vc else "-",
            fmt_bytes(mem.get("workspace")), fmt_bytes(mem.get("footprint")),
            _achieved(r), _pct(r),
        ])
    return cols, rows, notes


def _compile_note(rs: list[dict], sweep: bool = False) -> str:
    """One line: the compiled provider's compile time per mode (excluded from every timing)."""
    parts = [f"{r['mode']}{' IPC ' + str(r.get('ipc')) if sweep else ''} {r['compile_s']:.1f} s"
             for r in rs if r["provider"] == "compiled" and r["status"] == "ok" and r.get("compile_s") is not None]
    if not parts:
        return ""
    return ("compiled: torch.compile time (first calls above a warm one, in each case's own process; inductor's "
            "disk cache may serve repeats): " + ", ".join(parts) + "; excluded from the timings")


def _ceiling_note(rs: list[dict], ceilings: Optional[Ceilings]) -> str:
    """One line when this op's bandwidth ceiling is the at-size one, above the big-buffer figure."""
    if ceilings is None:
        return ""
    for r in rs:
        if (r["status"] == "ok" and r.get("bound") == "memory" and r.get("ceiling_source") == "measured"
                and r["ceiling"] > ceilings.copy_Bps):
            return (f"bandwidth ceiling at this op's own traffic ({fmt_bytes(r['bytes_moved'])}, {r['mode']}): "
                    f"{r['ceiling'] / 1e9:.1f} GB/s, above the {ceilings.copy_bytes >> 20} MiB buffer's "
                    f"{ceilings.copy_Bps / 1e9:.1f} GB/s (part of it stays in cache)")
    return ""


def print_table(title: str, cols: Sequence[str], rows: Sequence[Sequence[str]], *, caption: Sequence[str] = (),
                left: int = 1, styles: Optional[Sequence[Optional[str]]] = None) -> None:
    """One table: rich if installed, else aligned plain text. The first ``left`` columns are left-aligned,
    the rest right-aligned; ``caption`` lines (empty ones dropped) go below; ``styles``: a rich style per row."""
    caption = [c for c in caption if c]
    console = _console()
    if console is not None:
        from rich.table import Table
        t = Table(title=title, caption="\n".join(caption) or None, title_justify="left", caption_justify="left")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i < left else "right", no_wrap=True)
        for i, row in enumerate(rows):
            t.add_row(*row, style=styles[i] if styles else None)
        console.print(t)
        return
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    for row in (cols, ["-" * w for w in widths], *rows):
        print("  " + "  ".join(x.ljust(w) if i < left else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    for c in caption:
        print(f"  {c}")


def print_tables(results: list[dict], *, default_provider: DefaultProviders, sweep: bool = False,
                 ceilings: Optional[Ceilings] = None) -> None:
    """One table per op (per op and config in a sweep). ``*`` marks the provider ``auto`` picks for
    that op (``default_provider``: op -> provider, or one name for all)."""
    ops: dict[str, list[dict]] = {}
    for r in results:
        ops.setdefault(r["op"], []).append(r)
    for op, rs in ops.items():
        ok = [r for r in rs if r["status"] == "ok"]
        first = ok[0] if ok else rs[0]
        title = f"{op} @ {first['config']}"
        if not sweep:
            title += f" (IPC {first.get('ipc')}, N={first.get('N')}"
            if first.get("effective_scale", 1.0) != 1.0:
                title += f", scaled x{first['effective_scale']:g}"
            title += ")"
        cols, rows, notes = _rows(rs, _default_for(default_provider, op), sweep)
        shapes = first.get("shapes", "")
        if sweep and shapes:
            shapes = f"at IPC {first.get('ipc')}: {shapes}"
        sub = [shapes + (f"; {first['bound']}-bound" if first.get("bound") else ""),
               _compile_note(rs, sweep), _ceiling_note(rs, ceilings)] + notes
        left = cols.index("median")
        print_table(title, cols, rows, caption=sub, left=left,
                    styles=["dim" if row[left] in ("skipped", "error") else None for row in rows])


# ----------------------------------------------------------------------------- docs/benchmarks.md targets


def _find(results, op, mode, provider):
    for r in results:
        if r["op"] == op and r["mode"] == mode and r["provider"] == provider and r["status"] == "ok":
            return r
    return None


def targets(results: list[dict], *, device: str, config: str, default_provider: DefaultProviders,
            ceilings: Optional[Ceilings]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the docs/benchmarks.md targets this run can speak to, each judged
    on the provider ``auto`` picks for that op."""
    out: list[tuple[str, str, str]] = []

    def note(r):
        return "" if r.get("effective_scale", 1.0) == 1.0 else f" (scaled x{r['effective_scale']:g}: not the config's full size)"

    def speed(label, op, mode, need):
        dp = _default_for(default_provider, op)
        r = _find(results, op, mode, dp)
        if r is None or r.get("speedup") is None:
            return
        ok = r["speedup"] >= need
        out.append((label, f"{r['speedup']:.2f}x ({dp} vs baseline){note(r)}", "MET" if ok else "NOT MET"))

    if device == "cpu" and config == "cifar10-ipc1000":
        speed(">=10x DAE dae_ vs loop", "dae_", "fwd", 10)
        speed(">=10x DAE dae_sgd_step_ vs loop", "dae_sgd_step_", "fwd", 10)
        speed(">=10x CC fwd+bwd vs loop", "class_centralization_loss", "full", 10)
        speed(">=4x CM fwd+bwd vs loop", "covariance_matching_loss", "full", 4)
        rb = _find(results, "covariance_matching_loss", "full", "baseline")
        rd = _find(results, "covariance_matching_loss", "full", _default_for(default_provider, "covariance_matching_loss"))
        if rb and rd and rb.get("memory") and rd.get("memory"):
            mb, md = rb["memory"], rd["memory"]
            fr = mb["footprint"] / max(md["footprint"], 1)
            wr = mb["workspace"] / max(md["workspace"], 1)
            out.append(("CM peak RSS >=2.5x lower than loop (inputs+op)",
                        f"{fmt_bytes(mb['footprint'])} vs {fmt_bytes(md['footprint'])} = {fr:.2f}x{note(rd)}",
                        "MET" if fr >= 2.5 else "NOT MET"))
            out.append(("CM peak RSS >=2.5x lower than loop (workspace only)",
                        f"{fmt_bytes(mb['workspace'])} vs {fmt_bytes(md['workspace'])} = {wr:.2f}x{note(rd)}",
                        "MET" if wr >= 2.5 else "NOT MET"))
    rb = _find(results, "cpd_trajectory_loss", "full", "baseline")
    rd = _find(results, "cpd_trajectory_loss", "full", _default_for(default_provider, "cpd_trajectory_loss"))
    if rb and rd and rb.get("memory") and rd.get("memory") and rb["memory"]["workspace"] > 0:
        f = rd["memory"]["workspace"] / rb["memory"]["workspace"]
        out.append(("CPD workspace <=1% of the sort baseline's",
                    f"{fmt_bytes(rd['memory']['workspace'])} vs {fmt_bytes(rb['memory']['workspace'])} = "
                    f"{100 * f:.2f}%{note(rd)}", "MET" if f <= 0.01 else "NOT MET"))
    if device.startswith("cuda") and ceilings is not None:
        for op in ("dae_", "dae_sgd_step_"):
            r = _find(results, op, "fwd", _default_for(default_provider, op))
            if r and r.get("achieved_Bps"):
                f = min(1.0, r["achieved_Bps"] / max(ceilings.copy_Bps, r.get("ceiling") or 0.0))
                out.append((f">=85% copy bandwidth {op}", f"{100 * f:.1f}% ({r['achieved_Bps'] / 1e9:.0f} GB/s)",
                            "MET" if f >= 0.85 else "NOT MET"))
        if config == "imagenette-ipc50":
            speed(">=200x dae_sgd_step_ vs loop", "dae_sgd_step_", "fwd", 200)
        if config in ("imagenette-ipc50", "in1k-ipc50"):
            speed(">=5x CPD fwd+bwd vs sort", "cpd_trajectory_loss", "full", 5)
        if config in ("cifar100-ipc50", "cifar10-ipc1000"):
            speed(">=10x CM fwd+bwd vs loop", "covariance_matching_loss", "full", 10)
    return out


def print_targets(rows: list[tuple[str, str, str]]) -> None:
    if rows:
        print_table("docs/benchmarks.md targets, as measured by this run", ("target", "verdict", "measured"),
                    [(a, c, b) for a, b, c in rows], left=3,
                    styles=["green" if c == "MET" else "red" for _, _, c in rows])


# ----------------------------------------------------------------------------- JSON and plot


def write_json(path: str, meta: dict, results: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1, default=str)


@dataclass
class Series:
    """One line of a panel; ``band``: (low, high) shaded around it."""

    label: str
    x: list
    y: list
    color: Optional[str] = None
    style: str = "-"
    marker: Optional[str] = "o"
    band: Optional[tuple[list, list]] = None


@dataclass
class Panel:
    """One plot against a log x axis of integer points (IPC or steps); ``hline``: (y, label) drawn dashed."""

    title: str
    ylabel: str
    xlabel: str
    series: list[Series] = field(default_factory=list)
    ylog: bool = True
    hline: Optional[tuple[float, str]] = None


def plot_panels(path: str, rows: list[list[Panel]], *, title: str) -> None:
    """Write one figure, a row of panels per entry of ``rows`` (needs matplotlib; ``--plot`` checks it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(11, 3.2 * len(rows) + 0.8), squeeze=False)
    for panels, row in zip(rows, axes):
        for panel, ax in zip(panels, row):
            for s in panel.series:
                ax.plot(s.x, s.y, color=s.color, linestyle=s.style, marker=s.marker, label=s.label)
                if s.band is not None:
                    ax.fill_between(s.x, *s.band, color=s.color, alpha=0.15, linewidth=0)
            if panel.hline is not None:
                ax.axhline(panel.hline[0], color="gray", linestyle="--", label=panel.hline[1])
            xs = sorted({x for s in panel.series for x in s.x})
            ax.set_xscale("log")
            if panel.ylog:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(panel.title)
            ax.set_ylabel(panel.ylabel)
            ax.set_xlabel(panel.xlabel)
            ax.grid(True, which="major", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: str, results: list[dict], *, title: str) -> None:
    """Time and workspace against IPC, one row per op, one line per provider (and mode)."""
    colors = {"baseline": "tab:red", "reference": "tab:blue", "triton": "tab:green", "native": "tab:purple",
              "compiled": "tab:orange"}
    styles = {"fwd": ":", "bwd": "--", "full": "-"}
    rows = []
    for op in dict.fromkeys(r["op"] for r in results):
        series: dict[tuple[str, str], list[dict]] = {}
        for r in results:
            if r["op"] == op and r["status"] == "ok":
                series.setdefault((r["provider"], r["mode"]), []).append(r)
        modes = {m for _, m in series}
        mode_txt = "/".join(sorted(modes, key=MODE_ORDER.index))
        time_p = Panel(f"{op} ({mode_txt}): time per call", "ms (median, 20-80% band)", "images per class (IPC)")
        ws_p = Panel(f"{op} ({mode_txt}): workspace", "MB above inputs/outputs/grads", "images per class (IPC)",
                     ylog=False)
        for (prov, mode), pts in sorted(series.items(), key=lambda kv: (_porder(kv[0][0]), kv[0][1])):
            pts.sort(key=lambda r: r["ipc"])
            x = [r["ipc"] for r in pts]
            kw = dict(label=prov if len(modes) == 1 else f"{prov} {mode}", color=colors.get(prov),
                      style=styles.get(mode, "-"))
            time_p.series.append(Series(x=x, y=[r["median"] * 1e3 for r in pts],
                                        band=([r["q20"] * 1e3 for r in pts], [r["q80"] * 1e3 for r in pts]), **kw))
            ws = [(r.get("memory") or {}).get("workspace") for r in pts]
            if any(w is not None for w in ws):
                ws_p.series.append(Series(x=x, y=[(w or 0) / 2 ** 20 for w in ws], **kw))
        rows.append([time_p, ws_p])
    plot_panels(path, rows, title=title)
