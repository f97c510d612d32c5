"""``python -m edfkern.bench``: time, workspace and roofline of every op, per provider.

Default: the docs/benchmarks.md config (``cifar10-ipc1000``) on the best device, every op it
has, modes fwd and full, every provider that can run (``baseline`` = the loops of
:mod:`edfkern.baselines`, each backend of :func:`edfkern.backends`, and ``compiled`` =
``torch.compile`` of the plain PyTorch formulas in :mod:`edfkern.bench.compiled`). On CPU an op
whose inputs would pass ``--max-input-mb`` is scaled down (fewer images per class) and
the output says so; ``--scale`` fixes the factor for every op instead.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import edfkern

from . import memory, report
from . import args as args_
from .cases import OPS, default_provider, fit_scale, input_bytes, main_mode, op_modes, providers, skip_reason
from .ceilings import Ceilings, measure_at_sizes, measure_ceilings, settle
from .configs import CONFIGS, DEFAULT_CONFIG, Config, get_config
from .runner import run_task

TRITON_CPU_NOTE = ("on CPU, Triton kernels run only under TRITON_INTERPRET=1, a Python interpreter of the "
                   "kernel: its times say nothing about the compiled kernels, so triton is left out of CPU "
                   "timing (name it in --providers, with TRITON_INTERPRET=1 set, to time it anyway)")


def build_parser() -> argparse.ArgumentParser:
    p = args_.Parser(prog="python -m edfkern.bench", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, choices=list(CONFIGS), help="docs/benchmarks.md config")
    p.add_argument("--ops", help=f"comma-separated subset of: {', '.join(OPS)}")
    p.add_argument("--providers", help="comma-separated subset of baseline, the backends and compiled "
                                        "(default: all that run)")
    p.add_argument("--modes", help="comma-separated subset of fwd,bwd,full (default fwd,full, which keeps the "
                                   "CPU run short; a sweep: full, or fwd for ops without backward)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", help="write every result and the run's metadata as JSON")
    p.add_argument("--repeat", type=args_.int_in(1), help="timed calls per case (default: as many as fit --budget, "
                                                         "3..50)")
    p.add_argument("--budget", type=args_.positive_float(unit="seconds"), default=0.5,
                   help="seconds of timed calls per case when --repeat is not given (default 0.5)")
    p.add_argument("--scale", type=args_.positive_float(), help="multiply IPC, real rows per class and CPD's P by "
                                                              "this for every op (default on CPU: per op, to fit "
                                                              "--max-input-mb)")
    p.add_argument("--max-input-mb", type=args_.positive_float(unit="MB"), default=600.0,
                   help="CPU auto-scaling: largest input set per case at full size (default 600)")
    p.add_argument("--sweep", metavar="ipc=V1,V2,...", help="run every case at each IPC, e.g. ipc=10,50,100,500,1000")
    p.add_argument("--plot", metavar="PATH.png", help="with --sweep: plot time and workspace against IPC "
                                                      "(needs matplotlib)")
    p.add_argument("--no-memory", action="store_true", help="skip the workspace measurement")
    p.add_argument("--no-isolate", action="store_true",
                   help="run cases in this process (CPU workspace is then only approximate)")
    p.add_argument("--quick", action="store_true", help="small ceiling measurement (for smoke tests)")
    p.add_argument("--threads", type=args_.threads, help="torch.set_num_threads in each case (default: torch's "
                                                        "default; at most 4x the logical CPUs)")
    p.add_argument("--seed", type=args_.SEED, default=0, help="0 .. 2**32-1 (default 0)")
    p.add_argument("--timeout", type=args_.positive_float(args_.TIMEOUT_MAX_S, "seconds"), default=900.0,
                   help="seconds per case before it is killed (default 900)")
    return p


@dataclass
class Plan:
    """Everything the run needs, checked: built by :func:`plan` before any work."""

    device: str
    dev_type: str
    cfg0: Config
    ops: list[str]
    sweep: Optional[list[int]]
    modes_req: Optional[list[str]]
    chosen: list[str]
    skipped: dict[str, str]
    dflt: dict[str, Optional[str]]
    tasks: list[dict] = field(default_factory=list)
    scale_notes: list[str] = field(default_factory=list)


def plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """Check every argument, output paths included, and list the cases; a bad argument exits 2 (one line)."""
    device = args_.device(parser, args.device)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    cfg0 = get_config(args.config)
    ops = args_.names(parser, "--ops", args.ops, OPS) if args.ops is not None else list(OPS)
    modes_req = args_.names(parser, "--modes", args.modes, ("fwd", "bwd", "full")) if args.modes is not None else None
    sweep = args_.sweep(parser, args.sweep, ("ipc",))[1] if args.sweep is not None else None
    if args.plot is not None and not sweep:
        args_.fail(parser, "--plot", "needs --sweep ipc=...")
    if args.json is not None:
        args_.output_path(parser, "--json", args.json)
    if args.plot is not None:
        args_.plot_path(parser, args.plot, other=args.json)

    # --- providers: baseline + every backend + compiled; unavailable ones skipped with the reason
    known = ["baseline", *edfkern.backends(), "compiled"]
    requested = args_.names(parser, "--providers", args.providers, known) if args.providers is not None else None
    avail = providers(dev_type, probe_compiled=not requested or "compiled" in requested)
    chosen, skipped = [], {}
    for name, why in avail.items():
        if requested and name not in requested:
            continue
        if why is not None:
            skipped[name] = why
        elif name == "triton" and dev_type == "cpu" and not requested:
            skipped[name] = TRITON_CPU_NOTE
        else:
            chosen.append(name)
    if not chosen:
        args_.fail(parser, "--providers", "none of them can run here: "
                   + "; ".join(f"{n}: {w}" for n, w in skipped.items()))
    dflt = {op: (p if (p := default_provider(op, dev_type)) in chosen else None) for op in ops}
    out = Plan(device, dev_type, cfg0, ops, sweep, modes_req, chosen, skipped, dflt)

    # --- the cases, and whether their inputs alone fit the device's memory
    points = sweep or [None]
    biggest, big_case = 0, ""
    for ipc in points:
        cfg = cfg0.with_ipc(ipc) if ipc is not None else cfg0
        for op in ops:
            why = skip_reason(op, cfg)
            if why:
                if ipc == points[0]:
                    out.scale_notes.append(f"skipped op {op} at {cfg.name}: {why}")
                continue
            if args.scale is not None:
                scale = args.scale
            elif dev_type == "cpu" and sweep is None:
                scale = fit_scale(op, cfg, args.max_input_mb * 2 ** 20)
                if scale != 1.0:
                    scaled = cfg.scaled(scale)
                    out.scale_notes.append(
                        f"scaled {op} x{scale:g} on CPU: IPC {cfg.ipc} -> {scaled.ipc} (full-size inputs are "
                        f"{report.fmt_bytes(input_bytes(op, cfg))} > --max-input-mb {args.max_input_mb:g}; the loop "
                        f"baseline and input generation would dominate the run). --scale 1 runs the full size.")
            else:
                scale = 1.0
            wanted = modes_req or (["fwd", "full"] if sweep is None else [main_mode(op)])
            modes = [m for m in op_modes(op) if m in wanted]
            if not modes:  # e.g. --modes bwd for an op with no backward: say so rather than run another mode
                out.scale_notes.append(f"skipped {op}: it has no mode among {sorted(wanted)} (its modes: "
                                       f"{op_modes(op)})")
                continue
            need = input_bytes(op, cfg.scaled(scale))
            if need > biggest:
                biggest, big_case = need, f"{op} at IPC {cfg.scaled(scale).ipc}"
            for mode in modes:
                for prov in chosen:
                    out.tasks.append(dict(op=op, provider=prov, mode=mode, config=cfg0.name, ipc=ipc, scale=scale,
                                          device=device, seed=args.seed, repeat=args.repeat, budget_s=args.budget,
                                          memory=not args.no_memory, threads=args.threads))
    if not out.tasks:
        by_mode = modes_req is not None and any("has no mode among" in n for n in out.scale_notes)
        args_.fail(parser, "--modes" if by_mode else "--ops", f"no case to run: {'; '.join(out.scale_notes)}")
    room = _device_memory(device)
    if room is not None and biggest > room:
        arg = ("--sweep" if sweep else "--scale" if args.scale is not None
               else "--max-input-mb" if dev_type == "cpu" else "--config")
        args_.fail(parser, arg, f"the inputs of {big_case} alone need {report.fmt_bytes(biggest)}, more than the "
                                f"{report.fmt_bytes(room)} of memory {dev_type} has "
                                + ("available" if dev_type == "cpu" else "in total"))
    return out


def _device_memory(device: str) -> Optional[int]:
    """Bytes a case's inputs can use: available RAM on CPU, the GPU's total memory on CUDA (None: unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return memory.available_bytes()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def load_note(load: float, ncpu: int, *, own: float = 0.0, when: str = "at start") -> str:
    """One line: the 1-minute load average and what it implies for the timings.

    ``own``: the CPUs this run itself kept busy over that minute (0 before it starts); the rest
    of the load is other processes.
    """
    other = max(0.0, load - own)
    head = f"load average {when} {load:.2f} on {ncpu} CPUs"
    if own:
        head += f" (this run: ~{own:.1f})"
    if other < 0.25:
        return head + ": no other process was using a CPU; timings are undisturbed"
    if other + own <= ncpu:
        return (head + f": other processes were using ~{other:.1f} CPU; multi-threaded timings may be inflated "
                "(see p20/p80)")
    if own:
        return (head + f": other processes were using ~{other:.1f} CPU on top of this run's, more than the "
                f"{ncpu} CPUs hold; timings are inflated (see p20/p80)")
    return (head + f": other processes were using ~{other:.1f} CPU, more than the {ncpu} CPUs there are; "
            "timings are inflated (see p20/p80)")


def _default_note(dflt: dict[str, Optional[str]]) -> str:
    by: dict[str, list[str]] = {}
    for op, p in dflt.items():
        if p is not None:
            by.setdefault(p, []).append(op)
    if not by:
        return "* = auto's choice: none of the timed providers is what auto picks here"
    if len(by) == 1:
        return f"* = auto's choice on this device (edfkern._dispatch.auto_backend): {next(iter(by))} for every op"
    return ("* = auto's choice per op on this device (edfkern._dispatch.auto_backend): "
            + "; ".join(f"{p}: {', '.join(ops)}" for p, ops in by.items()))


def _ceiling_line(ceil: Ceilings, what: str) -> str:
    return (f"ceilings{what}: copy {ceil.copy_Bps / 1e9:.1f} GB/s (read+write, {ceil.copy_bytes >> 20} MiB buffer, "
            f"best of copy_ / in-place mul_ / read-only sum: {ceil.copy_kernel}), fp32 matmul "
            f"{ceil.matmul_flops / 1e9:.1f} GFLOP/s (n={ceil.matmul_n}, TF32 off)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    pl = plan(parser, args)  # every check; exits 2 with one line on bad input, before any work
    t_start = time.perf_counter()
    device, dev_type, cfg0, ops, sweep, modes_req = pl.device, pl.dev_type, pl.cfg0, pl.ops, pl.sweep, pl.modes_req
    chosen, skipped, dflt, tasks, scale_notes = pl.chosen, pl.skipped, pl.dflt, pl.tasks, pl.scale_notes

    notes = [f"device: {dev_type} = {_device_name(device)}",
             f"torch {torch.__version__}, edfkern {edfkern.__version__}"]
    if dev_type == "cpu":
        notes.append("no CUDA device: timings are CPU timings")
        load = _loadavg()
        if load is not None:
            notes.append(load_note(load, os.cpu_count() or 1))
    notes.append("providers: " + ", ".join(chosen) + "; " + _default_note(dflt))
    if "compiled" in chosen:
        notes.append("compiled = torch.compile (inductor, default mode, dynamic=False) of the plain vectorised "
                     "PyTorch formula of each op (edfkern.bench.compiled), forward and backward through autograd; "
                     "each case is compiled and warmed at its own shape before timing")
    for name, why in skipped.items():
        notes.append(f"skipped provider {name}: {why}")
    if "triton" in chosen and dev_type == "cpu":
        notes.append("warning: triton on CPU runs under the TRITON_INTERPRET=1 interpreter: its times are "
                     "interpreter times, not kernel times")
    if not modes_req and not sweep:
        notes.append("modes: fwd and full (forward+backward); --modes fwd,bwd,full adds backward alone")

    # --- ceilings, once per run
    print_fn = report.print_lines
    print_fn(notes)
    print(f"measuring device ceilings on {dev_type} ...", file=sys.stderr)
    ceil_start = measure_ceilings(device, quick=args.quick)
    print_fn([_ceiling_line(ceil_start, " at start")])

    # --- the cases (listed by plan())
    print_fn(scale_notes)

    results: list[dict] = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="edfkern.bench", unit="case", file=sys.stderr, leave=False,
                   dynamic_ncols=True)
    except ImportError:
        bar = None
    for task in tasks:
        label = f"{task['op']} {task['provider']} {task['mode']}" + (f" ipc={task['ipc']}" if task["ipc"] else "")
        if bar is not None:
            bar.set_postfix_str(label)
        try:
            if args.no_isolate:
                res = run_task(task)
            else:
                res = memory.run_isolated(run_task, task, timeout=args.timeout)
        except Exception as e:
            res = dict(task, status="error", reason=str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        results.append(res)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    # --- ceilings again at the end (best of each kept), at each memory-bound op's own traffic, and the 100% rule
    print(f"measuring device ceilings on {dev_type} again ...", file=sys.stderr)
    ceil_end = measure_ceilings(device, quick=args.quick)
    print_fn([_ceiling_line(ceil_end, " at end")])
    ceil = ceil_start.best(ceil_end)

    def at_sizes(c: Ceilings, sizes) -> Ceilings:
        return measure_at_sizes(c, device, sizes, quick=args.quick)

    mem_sizes = [r["bytes_moved"] for r in results if r["status"] == "ok" and r.get("bytes_moved")
                 and ceil.bound(r["bytes_moved"], r["flops"]) == "memory"]
    ceil = at_sizes(ceil, mem_sizes)
    report.add_derived(results, ceil)
    ceil, ceiling_notes = settle(results, ceil, lambda sizes: at_sizes(measure_ceilings(device, quick=args.quick),
                                                                        sizes))
    ceiling_notes.insert(0, _ceiling_line(ceil, " used (best of start and end)"))
    print_fn(ceiling_notes)
    report.print_tables(results, default_provider=dflt, sweep=sweep is not None, ceilings=ceil)
    rows = [] if sweep else report.targets(results, device=dev_type, config=cfg0.name, default_provider=dflt,
                                           ceilings=ceil)
    report.print_targets(rows)
    wall = time.perf_counter() - t_start
    load_end = _loadavg()
    if dev_type == "cpu" and load_end is not None:
        own = min(float(args.threads or torch.get_num_threads()), float(os.cpu_count() or 1))
        print(load_note(load_end, os.cpu_count() or 1, own=own, when="at end"))
    print(f"\nwall time {wall:.1f} s; time = median [20%, 80%] of the timed calls; speedup = baseline median / "
          "median; vs compiled = compiled median / median; workspace = peak above inputs, outputs and grads; footprint = peak above the process before "
          "the inputs existed; achieved = the op's minimum bytes (or FLOPs, when compute-bound) over its median "
          "time, against the measured ceiling (never above 100%: see the ceiling notes).")

    failed_write = False
    if args.plot:
        try:
            report.plot_sweep(args.plot, results, title=f"edfkern.bench sweep, {cfg0.name} shapes, "
                                                        f"{dev_type}: {_device_name(device)}")
            print(f"plot written to {args.plot}")
        except OSError as e:  # checked writable before the run; the disk can still fill up since
            print(f"python -m edfkern.bench: error: --plot {args.plot!r} not written: {e}", file=sys.stderr)
            failed_write = True
    if args.json:
        meta = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    command=" ".join(["python -m edfkern.bench", *(argv if argv is not None else sys.argv[1:])]),
                    device=dev_type, device_name=_device_name(device), torch=torch.__version__,
                    edfkern=edfkern.__version__, python=platform.python_version(), config=cfg0.name,
                    sweep_ipc=sweep, backends=edfkern.backends(), providers=chosen, skipped_providers=skipped,
                    default_provider=dflt, ceilings=ceil.as_dict(), ceilings_start=ceil_start.as_dict(),
                    ceilings_end=ceil_end.as_dict(), notes=notes + scale_notes + ceiling_notes,
                    targets=[dict(target=a, measured=b, verdict=c) for a, b, c in rows], wall_s=wall,
                    loadavg_end=load_end, threads=args.threads or torch.get_num_threads())
        try:
            report.write_json(args.json, meta, results)
            print(f"JSON written to {args.json}")
        except OSError as e:
            print(f"python -m edfkern.bench: error: --json {args.json!r} not written: {e}", file=sys.stderr)
            failed_write = True
    return 0 if not failed_write and not any(r["status"] == "error" for r in results) else 1
