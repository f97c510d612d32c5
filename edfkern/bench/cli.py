"""``python -m edfkern.bench``: time, workspace and roofline of every op per provider, or of a whole
distillation iteration (``--step``).

Per-op tables (the default): the docs/benchmarks.md config (``cifar10-ipc1000``) on the best
device, every op it has, modes fwd and full, every provider that can run (``baseline`` = the
loops of :mod:`edfkern.baselines`, each backend of :func:`edfkern.backends`, and ``compiled`` =
``torch.compile`` of the plain PyTorch formulas in :mod:`edfkern.bench.compiled`). On CPU an op
whose inputs would pass ``--max-input-mb`` is scaled down (fewer images per class) and the
output says so; ``--scale`` fixes the factor for every op instead.

``--step dm-iid|mtt-edf``: one whole distillation iteration, the loop version against the
edfkern one, swept over IPC or the student's steps (:mod:`edfkern.bench.steps`, below).

Both modes share one parser, one runner (:func:`edfkern.bench.memory.run_tasks`: a child
process per case, ``--timeout``, a memory watchdog for ``--step``), one report
(:mod:`edfkern.bench.report`) and the same JSON layout (``meta`` and ``results``). An argument
of the other mode is refused.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

import edfkern

from . import args as args_
from . import memory, report, steps
from .cases import OPS, default_provider, fit_scale, input_bytes, main_mode, op_modes, providers, skip_reason
from .ceilings import Ceilings, measure_at_sizes, measure_ceilings, settle
from .configs import CONFIGS, DEFAULT_CONFIG, Config, get_config
from .runner import run_task

PROG = "python -m edfkern.bench"
TRITON_CPU_NOTE = ("on CPU, Triton kernels run only under TRITON_INTERPRET=1, a Python interpreter of the "
                   "kernel: its times say nothing about the compiled kernels, so triton is left out of CPU "
                   "timing (name it in --providers, with TRITON_INTERPRET=1 set, to time it anyway)")
MB = 2 ** 20

# ----------------------------------------------------------------------------- the command line

_D = steps.StepParams()
#: the arguments of one mode only (their parser default is None, so that giving one in the other mode is
#: seen and refused) with their defaults in that mode
MODE_ONLY: dict[str, dict[str, Any]] = {
    "ops": dict(config=DEFAULT_CONFIG, ops=None, providers=None, modes=None, budget=0.5, scale=None,
                max_input_mb=600.0, no_memory=False, no_isolate=False, quick=False),
    "step": dict(ipc=None, budget_mb=6144.0, versions=None, width=_D.width, real_per_class=_D.real_per_class,
                 dm_forward="batched", syn_steps=None, batch_syn=_D.batch_syn, interval=_D.interval,
                 cam_width=_D.cam_width, cam_batch=_D.cam_batch),
}
#: the defaults of the arguments both modes take, where they differ
SHARED_DEFAULTS: dict[str, dict[str, Any]] = {
    "ops": dict(sweep=None, repeat=None, timeout=900.0),
    "step": dict(sweep="ipc=" + ",".join(map(str, steps.DEFAULT_SWEEP)), repeat=3, timeout=600.0),
}


def build_parser() -> argparse.ArgumentParser:
    p = args_.Parser(prog=PROG, description=__doc__, epilog=steps.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", help="write every result and the run's metadata as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="time and memory against the sweep's axis (needs matplotlib; "
                                                      "per-op tables: with --sweep)")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="per-op tables: ipc=... runs every case at each IPC, e.g. ipc=10,50,100,500,1000; --step: "
                        "ipc=... or, for mtt-edf, syn_steps=... (the unrolled student's steps, at --ipc) (--step default "
                        f"{SHARED_DEFAULTS['step']['sweep']})")
    p.add_argument("--repeat", type=args_.int_in(1), help="timed calls per case (default: as many as fit --budget, "
                                                         "3..50); --step: timed iterations per point after the "
                                                         "warm-up and the memory-measured one, median reported "
                                                         "(default 3)")
    p.add_argument("--timeout", type=args_.positive_float(args_.TIMEOUT_MAX_S, "seconds"),
                   help="seconds per case (--step: per child) before it is killed (default 900; --step 600, and a "
                        "point whose estimated time passes it is skipped)")
    p.add_argument("--threads", type=args_.threads, help="torch.set_num_threads in each case (default: torch's "
                                                        "default; at most 4x the logical CPUs)")
    p.add_argument("--seed", type=args_.SEED, default=0, help="0 .. 2**32-1 (default 0)")

    o = p.add_argument_group("per-op tables (without --step)")
    o.add_argument("--config", choices=list(CONFIGS), help=f"docs/benchmarks.md config (default {DEFAULT_CONFIG})")
    o.add_argument("--ops", help=f"comma-separated subset of: {', '.join(OPS)}")
    o.add_argument("--providers", help="comma-separated subset of baseline, the backends and compiled "
                                        "(default: all that run)")
    o.add_argument("--modes", help="comma-separated subset of fwd,bwd,full (default fwd,full, which keeps the "
                                   "CPU run short; a sweep: full, or fwd for ops without backward)")
    o.add_argument("--budget", type=args_.positive_float(unit="seconds"),
                   help="seconds of timed calls per case when --repeat is not given (default 0.5)")
    o.add_argument("--scale", type=args_.positive_float(), help="multiply IPC, real rows per class and CPD's P by "
                                                              "this for every op (default on CPU: per op, to fit "
                                                              "--max-input-mb)")
    o.add_argument("--max-input-mb", type=args_.positive_float(unit="MB"),
                   help="CPU auto-scaling: largest input set per case at full size (default 600)")
    o.add_argument("--no-memory", action="store_true", default=None, help="skip the workspace measurement")
    o.add_argument("--no-isolate", action="store_true", default=None,
                   help="run cases in this process (CPU workspace is then only approximate)")
    o.add_argument("--quick", action="store_true", default=None, help="small ceiling measurement (for smoke tests)")

    s = p.add_argument_group("whole iterations (--step)")
    s.add_argument("--step", help=f"the iteration to profile: {', '.join(steps.STEPS)}")
    s.add_argument("--ipc", type=args_.int_in(1), help=f"images per class of a syn_steps sweep (default "
                                                       f"{steps.DEFAULT_SWEEP[0]})")
    s.add_argument("--budget-mb", type=args_.positive_float(unit="MB"),
                   help="memory budget: points whose estimated peak passes it are skipped, a child passing it "
                        "(plus the runtime's own resident set) is killed, and the table names the largest point "
                        "within it (default 6144)")
    s.add_argument("--versions", help="comma-separated subset of the step's versions (default all: dm-iid "
                                      "loop,edfkern; mtt-edf loop,edfkern,constant)")
    s.add_argument("--width", type=args_.int_in(1), help=f"ConvNet width (default {_D.width})")
    s.add_argument("--real-per-class", type=args_.int_in(1), help=f"DM real batch per class ({_D.real_per_class})")
    s.add_argument("--dm-forward", choices=("batched", "per-class"),
                   help="DM edfkern version: embed the synthetic set in one forward (INTEGRATION.md) or class by "
                        "class as the loop does (default batched)")
    s.add_argument("--syn-steps", type=args_.int_in(1), help=f"MTT unrolled student steps ({_D.syn_steps})")
    s.add_argument("--batch-syn", type=args_.int_in(1), help=f"MTT synthetic images per student step ({_D.batch_syn})")
    s.add_argument("--interval", type=args_.int_in(1), help=f"EDF CAM refresh interval ({_D.interval})")
    s.add_argument("--cam-width", type=args_.int_in(1), help=f"width of the CAM ConvNet ({_D.cam_width})")
    s.add_argument("--cam-batch", type=args_.int_in(1), help=f"CAMExtractor batch_size: rows per noisy pass "
                                                             f"({_D.cam_batch})")
    return p


def parse(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace, str]:
    """(parser, arguments with the mode's defaults filled in, mode ``"ops"`` or ``"step"``); an argument of the
    other mode exits 2 with one line naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = "step" if args.step is not None else "ops"
    other = "ops" if mode == "step" else "step"
    for dest in MODE_ONLY[other]:
        if getattr(args, dest) is not None:
            args_.fail(parser, "--" + dest.replace("_", "-"),
                       "applies to --step runs only" if other == "step" else "applies to the per-op tables only, "
                                                                             "not to --step")
    for dest, value in {**MODE_ONLY[mode], **SHARED_DEFAULTS[mode]}.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return parser, args, mode


def main(argv: Optional[list[str]] = None) -> int:
    parser, args, mode = parse(argv)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    return run_steps(parser, args, command) if mode == "step" else run_ops(parser, args, command)


# ----------------------------------------------------------------------------- device, load and output files


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


def header(device: str, threads: Optional[int]) -> list[str]:
    """The run's first lines: the device, the versions and (CPU) the load average and what it implies."""
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    notes = [f"device: {dev_type} = {_device_name(device)}", f"torch {torch.__version__}, edfkern {edfkern.__version__}"
             + (f"; --threads {threads} in each case" if threads else "")]
    if dev_type == "cpu":
        notes.append("no CUDA device: timings are CPU timings")
        load = _loadavg()
        if load is not None:
            notes.append(load_note(load, os.cpu_count() or 1))
    return notes


def end_load_line(device: str, threads: Optional[int]) -> Optional[str]:
    """The load average at the end of a CPU run, with this run's own share taken out (None on CUDA)."""
    load = _loadavg()
    if device.startswith("cuda") or load is None:
        return None
    own = min(float(threads or torch.get_num_threads()), float(os.cpu_count() or 1))
    return load_note(load, os.cpu_count() or 1, own=own, when="at end")


def meta(command: str, device: str, threads: Optional[int], wall: float, **extra) -> dict:
    """The JSON's ``meta``: what ran, where, with which versions, plus ``extra``."""
    return dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=command,
                device="cuda" if device.startswith("cuda") else "cpu", device_name=_device_name(device),
                torch=torch.__version__, edfkern=edfkern.__version__, python=platform.python_version(),
                threads=threads or torch.get_num_threads(), wall_s=wall, loadavg_end=_loadavg(), **extra)


def write_outputs(args: argparse.Namespace, plot: Optional[Callable[[str], None]], meta_: dict,
                  results: list[dict]) -> bool:
    """Write ``--plot`` (with ``plot(path)``) and ``--json``; both were checked writable before the run, and a
    write that fails since (a full disk) is one line on stderr. True if every write succeeded."""
    ok = True
    for arg, path, write in (("--plot", args.plot, plot), ("--json", args.json,
                                                           lambda p: report.write_json(p, meta_, results))):
        if not path or write is None:
            continue
        try:
            write(path)
            print(f"{'plot' if arg == '--plot' else 'JSON'} written to {path}")
        except OSError as e:
            print(f"{PROG}: error: {arg} {path!r} not written: {e}", file=sys.stderr)
            ok = False
    return ok


# ----------------------------------------------------------------------------- per-op tables


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


def run_ops(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    """The per-op tables: every check first (:func:`plan`), then ceilings, the cases, ceilings again, the report."""
    pl = plan(parser, args)  # every check; exits 2 with one line on bad input, before any work
    t_start = time.perf_counter()
    device, dev_type, cfg0, sweep = pl.device, pl.dev_type, pl.cfg0, pl.sweep
    notes = header(device, args.threads)
    notes.append("providers: " + ", ".join(pl.chosen) + "; " + _default_note(pl.dflt))
    if "compiled" in pl.chosen:
        notes.append("compiled = torch.compile (inductor, default mode, dynamic=False) of the plain vectorised "
                     "PyTorch formula of each op (edfkern.bench.compiled), forward and backward through autograd; "
                     "each case is compiled and warmed at its own shape before timing")
    for name, why in pl.skipped.items():
        notes.append(f"skipped provider {name}: {why}")
    if "triton" in pl.chosen and dev_type == "cpu":
        notes.append("warning: triton on CPU runs under the TRITON_INTERPRET=1 interpreter: its times are "
                     "interpreter times, not kernel times")
    if not pl.modes_req and not sweep:
        notes.append("modes: fwd and full (forward+backward); --modes fwd,bwd,full adds backward alone")
    report.print_lines(notes)

    # --- ceilings, once at the start
    print(f"measuring device ceilings on {dev_type} ...", file=sys.stderr)
    ceil_start = measure_ceilings(device, quick=args.quick)
    report.print_lines([_ceiling_line(ceil_start, " at start")])
    report.print_lines(pl.scale_notes)

    # --- the cases (listed by plan())
    results: list[dict] = []
    for task, res, why in memory.run_tasks(
            pl.tasks, run_task, timeout=args.timeout, isolate=not args.no_isolate,
            label=lambda t: f"{t['op']} {t['provider']} {t['mode']}" + (f" ipc={t['ipc']}" if t["ipc"] else "")):
        results.append(res if why is None else dict(task, status="error", reason=why))

    # --- ceilings again at the end (best of each kept), at each memory-bound op's own traffic, and the 100% rule
    print(f"measuring device ceilings on {dev_type} again ...", file=sys.stderr)
    ceil_end = measure_ceilings(device, quick=args.quick)
    report.print_lines([_ceiling_line(ceil_end, " at end")])
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
    report.print_lines(ceiling_notes)
    report.print_tables(results, default_provider=pl.dflt, sweep=sweep is not None, ceilings=ceil)
    rows = [] if sweep else report.targets(results, device=dev_type, config=cfg0.name, default_provider=pl.dflt,
                                           ceilings=ceil)
    report.print_targets(rows)
    wall = time.perf_counter() - t_start
    end = end_load_line(device, args.threads)
    if end:
        print(end)
    print(f"\nwall time {wall:.1f} s; time = median [20%, 80%] of the timed calls; speedup = baseline median / "
          "median; vs compiled = compiled median / median; workspace = peak above inputs, outputs and grads; "
          "footprint = peak above the process before the inputs existed; achieved = the op's minimum bytes (or "
          "FLOPs, when compute-bound) over its median time, against the measured ceiling (never above 100%: see "
          "the ceiling notes).")

    plot = (lambda path: report.plot_sweep(path, results, title=f"edfkern.bench sweep, {cfg0.name} shapes, "
                                                                f"{dev_type}: {_device_name(device)}"))
    m = meta(command, device, args.threads, wall, config=cfg0.name, sweep_ipc=sweep, backends=edfkern.backends(),
             providers=pl.chosen, skipped_providers=pl.skipped, default_provider=pl.dflt, ceilings=ceil.as_dict(),
             ceilings_start=ceil_start.as_dict(), ceilings_end=ceil_end.as_dict(),
             notes=notes + pl.scale_notes + ceiling_notes,
             targets=[dict(target=a, measured=b, verdict=c) for a, b, c in rows])
    written = write_outputs(args, plot, m, results)
    return 0 if written and not any(r["status"] == "error" for r in results) else 1


# ----------------------------------------------------------------------------- whole iterations (--step)


@dataclass
class StepPlan:
    """Everything a ``--step`` run needs, checked: built by :func:`plan_steps` before any work."""

    device: str
    axis: str
    points: list[steps.Point]
    params: steps.StepParams
    versions: list[str]
    budget: float
    results: dict[tuple[int, str], dict] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    skip_notes: list[str] = field(default_factory=list)


def _step_params(args: argparse.Namespace) -> steps.StepParams:
    return steps.StepParams(width=args.width, real_per_class=args.real_per_class,
                            syn_steps=args.syn_steps or _D.syn_steps, batch_syn=args.batch_syn,
                            interval=args.interval, cam_width=args.cam_width, cam_batch=args.cam_batch,
                            dm_batched_forward=args.dm_forward == "batched")


def plan_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> StepPlan:
    """Check every ``--step`` argument, output paths included; a bad one exits 2 with one line, before any work."""
    step = args.step
    if step not in steps.STEPS:
        args_.fail(parser, "--step", f"unknown step {step!r}; expected one of {', '.join(steps.STEPS)}")
    device = args_.device(parser, args.device)
    axis, values = args_.sweep(parser, args.sweep, steps.SWEEP_KEYS)
    if axis == "ipc" and args.ipc is not None:
        args_.fail(parser, "--ipc", "sets the IPC of a syn_steps sweep; with --sweep ipc=... leave it out")
    if axis == "syn_steps" and step != "mtt-edf":
        args_.fail(parser, "--sweep", f"syn_steps applies to --step mtt-edf only (got --step {step})")
    if axis == "syn_steps" and args.syn_steps is not None:
        args_.fail(parser, "--syn-steps", "--sweep syn_steps=... sets the steps; leave --syn-steps out")
    p = _step_params(args)
    points = steps.sweep_points(axis, values, p, args.ipc or steps.DEFAULT_SWEEP[0])
    versions = (args_.names(parser, "--versions", args.versions, steps.STEP_VERSIONS[step])
                if args.versions is not None else list(steps.STEP_VERSIONS[step]))
    budget = args.budget_mb * MB
    ipc0 = min(pt.ipc for pt in points)
    need = steps.input_bytes(step, ipc0, p)
    if need > budget:
        args_.fail(parser, "--budget-mb", f"{args.budget_mb:g} MB is less than the inputs alone at IPC {ipc0} "
                   f"({need / MB:.0f} MB: synthetic images, their gradient and momentum buffer, "
                   + ("the real batch)" if step == "dm-iid" else "the expert's start and target params)"))
    if args.json is not None:
        args_.output_path(parser, "--json", args.json)
    if args.plot is not None:
        args_.plot_path(parser, args.plot, other=args.json)
    return StepPlan(device, axis, points, p, versions, budget)


def _step_tasks(pl: StepPlan, args: argparse.Namespace, flops_per_s: float, avail: Optional[int]) -> None:
    """Fill ``pl.results`` (one row per point and version) and ``pl.tasks`` (a memory child per version, one
    lockstep timing child per point), skipping, with the reason, what the estimates say will not fit."""
    step, label = args.step, steps.AXIS_LABEL[pl.axis]
    common = dict(step=step, device=pl.device, seed=args.seed, threads=args.threads)

    def skip(what: str, est: float, secs: float, rows: list[dict], run: str = "") -> bool:
        why = None
        if est > pl.budget:
            why = f"estimated peak{run} {report.fmt_bytes(est)} > --budget-mb {args.budget_mb:g}"
        elif not run and avail is not None and est > 0.8 * avail:
            why = f"estimated peak {report.fmt_bytes(est)} > 80% of the available memory ({report.fmt_bytes(avail)})"
        elif secs > args.timeout:
            why = f"estimated time{run or ' of the memory run'} {secs:.0f} s > --timeout {args.timeout:g}"
        if why:
            pl.skip_notes.append(f"skip {what}: {why}")
            for r in rows:
                r.update(status="skipped", reason=why)
        return why is not None

    for pt in pl.points:
        ipc, pp = pt.ipc, pt.params
        fit = []
        for v in pl.versions:
            r = pl.results[(pt.x, v)] = dict(step=step, version=v, axis=pl.axis, x=pt.x, ipc=ipc, N=pp.K * ipc,
                                              syn_steps=pp.syn_steps)
            est = steps.estimate_peak_bytes(step, v, ipc, pp)
            secs = steps.estimate_seconds(step, v, ipc, pp, 1, 1, flops_per_s)
            r.update(estimate_bytes=est, estimate_s=secs)
            if not skip(f"{step} {label} {pt.x} {v}", est, secs, [r]):
                fit.append(v)
                pl.tasks.append(dict(common, mode="memory", version=v, ipc=ipc, x=pt.x, params=asdict(pp),
                                     estimate_s=secs))
        if not fit:
            continue
        # the lockstep run holds every version's inputs at once, and one version's activations at a time
        est = (max(steps.estimate_peak_bytes(step, v, ipc, pp) for v in fit)
               + (len(fit) - 1) * steps.input_bytes(step, ipc, pp))
        secs = sum(steps.estimate_seconds(step, v, ipc, pp, 1 + args.repeat, 0, flops_per_s) for v in fit) \
            + (steps.estimate_seconds(step, "edfkern", ipc, pp, 0, 1, flops_per_s) if step == "mtt-edf" else 0)
        if not skip(f"timing {step} {label} {pt.x}", est, secs, [pl.results[(pt.x, v)] for v in fit],
                    run=" of the lockstep run"):
            pl.tasks.append(dict(common, mode="time", versions=fit, ipc=ipc, x=pt.x, params=asdict(pp),
                                 repeat=args.repeat, estimate_s=secs))


def run_steps(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    """``--step``: every check first (:func:`plan_steps`), the estimates, the children, the report."""
    pl = plan_steps(parser, args)
    t_start = time.perf_counter()
    ceil = measure_ceilings(pl.device, quick=True)
    flops_per_s = 0.4 * ceil.matmul_flops  # convolutions reach about this fraction of the matmul rate (CPU, measured)
    avail = memory.available_bytes()
    report.print_lines(header(pl.device, args.threads))
    print(f"step {args.step}: " + steps.describe(args.step, pl.params)
          + (f"; swept: syn_steps {[pt.x for pt in pl.points]} at IPC {pl.points[0].ipc}"
             if pl.axis == "syn_steps" else ""))
    print(f"budget {args.budget_mb:g} MB; available memory {report.fmt_bytes(avail)}; fp32 matmul "
          f"{ceil.matmul_flops / 1e9:.1f} GFLOP/s (time estimates use 40% of it)")
    _step_tasks(pl, args, flops_per_s, avail)
    report.print_lines(pl.skip_notes)

    # kill limit: the budget plus what a fresh child with torch loaded already holds
    limit = pl.budget + (memory.rss_bytes() or 512 * MB) + 256 * MB
    if avail is not None:
        limit = min(limit, int(0.9 * avail))

    def mine(task: dict) -> list[dict]:
        return [pl.results[(task["x"], v)] for v in ([task["version"]] if task["mode"] == "memory"
                                                     else task["versions"])]

    for task, out, why in memory.run_tasks(
            pl.tasks, steps.run_step_task, timeout=args.timeout, limit=int(limit),
            desc=f"edfkern.bench --step {args.step}",
            label=lambda t: (f"{steps.AXIS_LABEL[pl.axis]} {t['x']} {t['mode']} "
                             f"{t.get('version') or '+'.join(t['versions'])} (est. {t['estimate_s']:.0f} s)"),
            skip=lambda t: any(r.get("status") == "error" for r in mine(t))):
        if why is not None:
            for r in mine(task):
                r.update(status="error", reason=f"{task['mode']} run: {why}")
        elif task["mode"] == "memory":
            pl.results[(task["x"], task["version"])].update(out)
        else:
            for v, o in out.items():
                pl.results[(task["x"], v)].update(o, status="ok", repeat=task["repeat"])
    results = list(pl.results.values())
    for r in results:
        r.setdefault("status", "error")
        r.setdefault("reason", "not run")
        if r["status"] == "ok":
            steps.summarise(r, pl.params)
    results.sort(key=lambda r: (r["x"], steps.VERSIONS.index(r["version"])))
    title, cols, rows, caption, notes = steps.table(args.step, results, pl.budget, pl.versions, axis=pl.axis)
    report.print_table(title, cols, rows, caption=caption, left=2,
                       styles=["dim" if row[2] in ("skipped", "error") else None for row in rows])
    report.print_lines(notes)
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.1f} s" + (f"; {end}" if (end := end_load_line(pl.device, args.threads)) else ""))

    plot_title = (f"edfkern.bench --step {args.step}: {' vs '.join(pl.versions)}, {pl.device} "
                  f"({_device_name(pl.device)})" + (f", IPC {pl.points[0].ipc}" if pl.axis == "syn_steps" else ""))
    m = meta(command, pl.device, args.threads, wall, step=args.step, params=asdict(pl.params),
             description=steps.describe(args.step, pl.params), sweep_axis=pl.axis, sweep=[pt.x for pt in pl.points],
             sweep_ipc=sorted({pt.ipc for pt in pl.points}), budget_mb=args.budget_mb, kill_limit_bytes=limit,
             available_bytes=avail, matmul_flops=ceil.matmul_flops, notes=pl.skip_notes + notes)
    written = write_outputs(args, lambda path: report.plot_panels(
        path, [steps.panels(args.step, results, pl.budget, axis=pl.axis)], title=plot_title), m, results)
    return 0 if written and not any(r["status"] == "error" for r in results) else 1
