"""CLI argument errors of ``python -m edfkern.bench``, per-op tables and ``--step`` mode alike.

Every bad argument is refused before any work: exit code 2, exactly one line on stderr, naming the
argument. Output paths (``--json``, ``--plot``) are checked writable before the run. Valid input still
reaches the run (the controls).

No benchmark runs here: the probes call the entry point in this process with the work entry points
(the device ceilings, the child processes, the in-process runner) replaced by a sentinel that stops the
run the moment it would start, and the ``torch.compile`` probe answered without compiling. Each probe
takes milliseconds.

``python tests/test_edges_cli.py`` runs the same table as an adversarial sweep and prints, per class,
``tried / held / failed`` with how each failure failed (exit 1, a traceback, several lines, the wrong
argument named, or the run started).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Optional
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import edfkern.bench.ceilings as _ceilings  # noqa: E402
import edfkern.bench.cli as _cli  # noqa: E402
import edfkern.bench.compiled as _compiled  # noqa: E402
import edfkern.bench.memory as _memory  # noqa: E402
from edfkern.bench.__main__ import _run  # noqa: E402


class Started(BaseException):
    """Raised where the run would start its work (not an Exception: no ``except Exception`` swallows it)."""


def _started(*a, **k):
    raise Started()


@dataclass
class Outcome:
    code: Optional[int]      # exit code; None if the run started (no exit)
    err: list[str]           # non-empty stderr lines
    started: bool
    crash: Optional[str] = None  # an exception that escaped main(), as its last traceback line


def probe(argv: list[str]) -> Outcome:
    """Call the CLI entry point on ``argv`` with the work replaced by :class:`Started`."""
    out, err = io.StringIO(), io.StringIO()
    patches = [mock.patch.object(_ceilings, "measure_ceilings", _started),
               mock.patch.object(_cli, "measure_ceilings", _started),
               mock.patch.object(_cli, "run_task", _started),
               mock.patch.object(_memory, "run_isolated", _started),
               mock.patch.object(_compiled, "probe", lambda device: None),
               mock.patch.object(sys, "argv", ["python -m edfkern.bench", *argv])]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            rc = _run()
            res = Outcome(rc, [], False)
        except Started:
            res = Outcome(None, [], True)
        except SystemExit as e:  # a str code is what `raise SystemExit("msg")` gives: exit 1, msg on stderr
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            res = Outcome(1 if isinstance(e.code, str) else (e.code or 0), [], False)
        except Exception:
            res = Outcome(1, [], False, crash=traceback.format_exc().strip().splitlines()[-1])
    res.err = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return res


def verdict(o: Outcome, needle: Optional[str]) -> Optional[str]:
    """None if the probe held; else how it failed. ``needle=None``: a control, which must start the run."""
    if needle is None:
        if o.started and not o.crash:
            return None
        return f"refused valid input: exit {o.code}: {(o.err or [o.crash or ''])[-1][:160]}"
    if o.started:
        return "ran (the argument was not checked before the work)"
    if o.crash:
        return f"traceback: {o.crash[:160]}"
    if o.code != 2:
        return f"exit {o.code}" + (f": {o.err[-1][:160]}" if o.err else "")
    if len(o.err) != 1:
        return f"{len(o.err)} lines on stderr"
    if needle not in o.err[0]:
        return f"does not name {needle}: {o.err[0][:160]}"
    return None


# ----------------------------------------------------------------------------- the probes
# (argv, the argument the one line must name); "{tmp}" is a scratch directory, "{file}" a regular file in it.

M = ["--device", "cpu", "--quick"]     # main mode, fast and CPU
S = ["--step", "mtt-edf"]              # step mode

NAMES = [
    (M + ["--ops", ""], "--ops"),
    (M + ["--ops", ","], "--ops"),
    (M + ["--ops", "nope"], "--ops"),
    (M + ["--ops", "dae_,nope"], "--ops"),
    (M + ["--providers", ""], "--providers"),
    (M + ["--providers", "nope"], "--providers"),
    (M + ["--providers", "baseline,gpu"], "--providers"),
    (M + ["--modes", ""], "--modes"),
    (M + ["--modes", "fwd,back"], "--modes"),
    (M + ["--modes", "bwd", "--ops", "dae_"], "--modes"),                     # dae_ has no backward: no case
    (M + ["--config", "cifar100-ipc50", "--ops", "cpd_trajectory_loss"], "--ops"),  # no CPD expert: no case
    (M + ["--config", "nope"], "--config"),
    (["--device", "tpu", "--quick"], "--device"),
    (["--device", "", "--quick"], "--device"),
    (["--device", "cuda:99", "--quick"], "--device"),
    (["--step", "nope"], "--step"),
    (["--step="], "--step"),
    (S + ["--versions", ""], "--versions"),
    (S + ["--versions", "loop,fast"], "--versions"),
    (S + ["--device", "tpu"], "--device"),
    (S + ["--device", "cuda:99"], "--device"),
]

SWEEP = [
    (M + ["--sweep", "ipc"], "--sweep"),
    (M + ["--sweep", "ipc="], "--sweep"),
    (M + ["--sweep", "n=10"], "--sweep"),
    (M + ["--sweep", "ipc=10,0"], "--sweep"),
    (M + ["--sweep", "ipc=-5"], "--sweep"),
    (M + ["--sweep", "ipc=ten"], "--sweep"),
    (M + ["--sweep", "ipc=1.5"], "--sweep"),
    (M + ["--sweep", "ipc=2,,4"], "--sweep"),
    (M + ["--sweep", "ipc=100000000"], "--sweep"),  # inputs far above this machine's memory
    (M + ["--plot", "{tmp}/p.png"], "--plot"),       # --plot needs --sweep
    (S + ["--sweep", "n=10"], "--sweep"),
    (S + ["--sweep", "ipc="], "--sweep"),
    (S + ["--sweep", "ipc=0"], "--sweep"),
    (S + ["--sweep", "ipc=x"], "--sweep"),
    (S + ["--sweep", "ipc=2,,4"], "--sweep"),
    (S + ["--sweep", "syn_steps=10,0"], "--sweep"),
    (["--step", "dm-iid", "--sweep", "syn_steps=10"], "--sweep"),
    (S + ["--sweep", "ipc=1,2", "--ipc", "3"], "--ipc"),
    (S + ["--sweep", "syn_steps=10", "--syn-steps", "5"], "--syn-steps"),
]

NUMBERS = [
    (M + ["--scale", "0"], "--scale"),
    (M + ["--scale", "-1"], "--scale"),
    (M + ["--scale", "nan"], "--scale"),
    (M + ["--scale", "inf"], "--scale"),
    (M + ["--scale", "1e9"], "--scale"),             # inputs far above this machine's memory
    (M + ["--repeat", "0"], "--repeat"),
    (M + ["--repeat", "-1"], "--repeat"),
    (M + ["--threads", "-3"], "--threads"),
    (M + ["--threads", "0"], "--threads"),
    (M + ["--threads", "100000"], "--threads"),
    (M + ["--timeout", "0"], "--timeout"),
    (M + ["--timeout", "-1"], "--timeout"),
    (M + ["--timeout", "nan"], "--timeout"),
    (M + ["--timeout", "inf"], "--timeout"),
    (M + ["--budget", "0"], "--budget"),
    (M + ["--budget", "nan"], "--budget"),
    (M + ["--max-input-mb", "0"], "--max-input-mb"),
    (M + ["--max-input-mb", "nan"], "--max-input-mb"),
    (M + ["--seed", "-1"], "--seed"),
    (M + ["--seed", str(2 ** 70)], "--seed"),
    (S + ["--repeat", "0"], "--repeat"),
    (S + ["--sweep", "syn_steps=10", "--ipc", "0"], "--ipc"),
    (S + ["--timeout", "0"], "--timeout"),
    (S + ["--timeout", "nan"], "--timeout"),
    (S + ["--timeout", "inf"], "--timeout"),
    (S + ["--budget-mb", "nan"], "--budget-mb"),
    (S + ["--budget-mb", "inf"], "--budget-mb"),
    (S + ["--threads", "-3"], "--threads"),
    (S + ["--threads", "0"], "--threads"),
    (S + ["--width", "0"], "--width"),
    (S + ["--syn-steps", "-1"], "--syn-steps"),
    (S + ["--batch-syn", "0"], "--batch-syn"),
    (S + ["--interval", "0"], "--interval"),
    (S + ["--seed", "-1"], "--seed"),
]

OUTPUTS = [
    (M + ["--json", "/nonexistent-edfkern-dir/r.json"], "--json"),
    (M + ["--json", "{file}/r.json"], "--json"),     # parent is a regular file
    (M + ["--json", "{tmp}"], "--json"),             # a directory
    (M + ["--json", "/proc/edfkern-r.json"], "--json"),
    (M + ["--json", ""], "--json"),
    (M + ["--sweep", "ipc=2", "--plot", "/nonexistent-edfkern-dir/p.png"], "--plot"),
    (M + ["--sweep", "ipc=2", "--plot", "{tmp}/p.notaformat"], "--plot"),
    (M + ["--sweep", "ipc=2", "--plot", "{tmp}/same.png", "--json", "{tmp}/same.png"], "--plot"),
    (M + ["--sweep", "ipc=2", "--plot", "{tmp}/noextension"], "--plot"),  # matplotlib would write noextension.png
    (S + ["--json", "/nonexistent-edfkern-dir/r.json"], "--json"),
    (S + ["--json", "{file}/r.json"], "--json"),
    (S + ["--json", "{tmp}"], "--json"),
    (S + ["--json", "/proc/edfkern-r.json"], "--json"),
    (S + ["--plot", "/nonexistent-edfkern-dir/p.png"], "--plot"),
    (S + ["--plot", "{tmp}/p.notaformat"], "--plot"),
    (S + ["--plot", "{tmp}/same.png", "--json", "{tmp}/same.png"], "--plot"),
]

PARSING = [
    (M + ["--bogus"], "--bogus"),
    (M + ["--repeat"], "--repeat"),
    (M + ["--scale", "abc"], "--scale"),
    (M + ["--config"], "--config"),
    (M + ["--syn-steps", "3"], "--syn-steps"),       # a --step argument without --step
    (S + ["--bogus"], "--bogus"),
    (S + ["--ops", "dae_"], "--ops"),                # a main-mode argument in --step mode
    (S + ["--repeat", "x"], "--repeat"),
]

CONTROLS = [
    (M + ["--ops", "dae_", "--providers", "baseline"], None),
    (M + ["--ops", " dae_ ,class_centralization_loss", "--providers", "baseline,reference", "--modes", "fwd"], None),
    (M + ["--sweep", "ipc=2,4", "--plot", "{tmp}/s.png", "--json", "{tmp}/s.json"], None),
    (M + ["--scale", "0.01", "--repeat", "1", "--threads", "1", "--timeout", "30", "--seed", "7"], None),
    (M + ["--json", "{file}"], None),                # an existing file is overwritten
    (M + ["--json", "r.json"], None),                # a bare name: the current directory
    (S + ["--sweep", "ipc=1,2", "--json", "{tmp}/t.json", "--plot", "{tmp}/t.png"], None),
    (["--step=dm-iid", "--repeat", "1", "--threads", "1", "--timeout", "5"], None),
    (S + ["--sweep", "syn_steps=10,20", "--ipc", "1", "--versions", "constant,loop"], None),
]

CLASSES = {"unknown or empty names": NAMES, "--sweep": SWEEP, "numbers out of range": NUMBERS,
           "output paths": OUTPUTS, "parse errors": PARSING, "controls (valid input runs)": CONTROLS}


def _fill(argv: list[str], tmp: str) -> list[str]:
    f = os.path.join(tmp, "afile")
    if not os.path.exists(f):
        with open(f, "w") as fh:
            fh.write("x")
    return [a.replace("{tmp}", tmp).replace("{file}", f) for a in argv]


def failures(cases, tmp: str) -> list[str]:
    """``"argv: how it failed"`` for every probe of ``cases`` that did not hold (run from ``tmp``)."""
    bad = []
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        for argv, needle in cases:
            argv = _fill(argv, tmp)
            why = verdict(probe(argv), needle)
            if why:
                bad.append(f"{' '.join(repr(a) if not a or ' ' in a else a for a in argv)}: {why}")
    finally:
        os.chdir(cwd)
    return bad


# ----------------------------------------------------------------------------- the tests (one per class)


def _check(cases, tmp_path):
    bad = failures(cases, str(tmp_path))
    assert not bad, f"{len(bad)} of {len(cases)} probes did not hold:\n" + "\n".join(bad)


def test_cli_unknown_or_empty_names_exit_2_one_line(tmp_path):
    _check(NAMES, tmp_path)


def test_cli_bad_sweep_exits_2_one_line(tmp_path):
    _check(SWEEP, tmp_path)


def test_cli_numbers_out_of_range_exit_2_before_any_case(tmp_path):
    _check(NUMBERS, tmp_path)


def test_cli_output_paths_checked_before_running(tmp_path):
    _check(OUTPUTS, tmp_path)
    assert not (tmp_path / "same.png").exists() and not list(tmp_path.glob(".edfkern-write-check-*"))


def test_cli_parse_errors_are_one_line(tmp_path):
    _check(PARSING, tmp_path)


def test_cli_valid_input_still_runs(tmp_path):
    """Guard against over-refusing: every control reaches the run, and no output was written by the checks."""
    _check(CONTROLS, tmp_path)
    assert (tmp_path / "afile").read_text() == "x"  # the writability check of an existing file keeps it
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "t.png").exists()


if __name__ == "__main__":
    width = max(map(len, CLASSES))
    totals = [0, 0, 0]
    with tempfile.TemporaryDirectory() as tmp:
        for name, cases in CLASSES.items():
            bad = failures(cases, tmp)
            n = len(cases)
            totals = [totals[0] + n, totals[1] + n - len(bad), totals[2] + len(bad)]
            print(f"{name:<{width}}  tried {n:3d}  held {n - len(bad):3d}  failed {len(bad):3d}")
            for b in bad:
                print(f"    {b}")
    print(f"{'total':<{width}}  tried {totals[0]:3d}  held {totals[1]:3d}  failed {totals[2]:3d}")
