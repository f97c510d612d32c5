"""Adversarial sweep of the distributed surface (issue 20, class 1: "distributed calls carry no identity").

Not collected by pytest (the CI tests are ``tests/test_edges_distributed.py``); run by hand::

    PYTHONPATH=. python tests/sweep_dist_edges.py            # worlds of 2 and 3, every probe
    PYTHONPATH=. python tests/sweep_dist_edges.py 2 cpd,limit  # world of 2, probes whose name contains a word

Each probe runs in its *own* spawned gloo world (a probe may kill its world: gloo aborts the process on
mismatched buffer sizes), with ``EDFKERN_DIST_TIMEOUT=6`` and a 60 s wall-clock deadline. A probe is a
list of steps, run in the same order on every rank; a step is either

- ``err``: bad input somewhere; it *holds* when every rank raises ``ValueError``/``TypeError`` whose
  message contains the given words, or
- ``val``: a good call; it holds when every rank returns the single-process value (float64 oracle
  of ``edfkern.baselines`` on the union), which is how a shifted pairing (silently wrong) shows.

Outcome per probe: ``held``, or the first failure: ``crash`` (a rank died), ``hang`` (a collective
timed out or the world passed its deadline), ``wrong`` (a value differs), ``one-rank`` (some rank
raised, another did not), ``unclear`` (an error without the expected words, or not a ValueError/TypeError).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repo root, for tests.*

from tests._dist_launch import free_port  # noqa: E402

# ----------------------------------------------------------------------------- probes (run inside a rank)

RANK = WORLD = 0
PG = None


def _data(seed: int = 0):
    """This rank's view of the global rows of ``seed`` (:func:`tests._utils.rank_rows`)."""
    from tests._utils import rank_rows
    return rank_rows(seed, RANK, WORLD)


def good(op: str, seed: int = 0):
    """A correct call of ``op`` on this rank's share: returns ``(got, oracle)``."""
    import torch
    import edfkern.baselines as B
    import edfkern.distributed as ED
    x, r, y, sl = _data(seed)
    if op == "local_covariance":
        return ED.local_covariance(x[sl], groups=y[sl], num_groups=3, process_group=PG), \
            B.local_covariance(x, groups=y, num_groups=3)
    if op == "covariance_matching_loss":
        return ED.covariance_matching_loss(x[sl], r[sl], syn_groups=y[sl], real_groups=y[sl], num_groups=3, weight=0.5,
                                           process_group=PG), \
            B.covariance_matching_loss(x, r, syn_groups=y, real_groups=y, num_groups=3, weight=0.5)
    if op == "class_centralization_loss":
        return ED.class_centralization_loss(x[sl].flatten(1), groups=y[sl], num_groups=3, weight=0.3,
                                            process_group=PG), \
            B.class_centralization_loss(x.flatten(1), groups=y, num_groups=3, weight=0.3)
    if op == "mean_matching_loss":
        return ED.mean_matching_loss(x[sl].flatten(1), r[sl].flatten(1), syn_groups=y[sl], real_groups=y[sl],
                                     num_groups=3, process_group=PG), \
            B.mean_matching_loss(x.flatten(1), r.flatten(1), syn_groups=y, real_groups=y, num_groups=3)
    s, t, s0 = x.flatten(), r.flatten(), torch.zeros_like(x.flatten())
    o, n = sl.start * 6, (sl.stop - sl.start) * 6
    if op == "cpd_trajectory_loss":
        return ED.cpd_trajectory_loss(s[o:o + n], t[o:o + n], s0[o:o + n], drop_ratio=0.375, process_group=PG), \
            B.cpd_trajectory_loss(s, t, s0, drop_ratio=0.375)
    if op == "cpd_keep_mask":
        return ED.cpd_keep_mask((s - t)[o:o + n] ** 2, 0.375, process_group=PG).double(), \
            B.cpd_keep_mask((s - t) ** 2, 0.375)[o:o + n].double()
    if op == "reduce_class_stats":
        sums, cnt = torch.arange(4.0) * (RANK + 1), torch.full((4,), RANK + 1.0)
        tot = WORLD * (WORLD + 1) / 2
        got = ED.reduce_class_stats(sums, cnt, group=PG)
        return torch.cat(got), torch.cat([torch.arange(4.0) * tot, torch.full((4,), tot)])
    raise KeyError(op)


def on(rank: int, bad, ok):
    """``bad()`` on ``rank`` (negative: counted from the end), ``ok()`` elsewhere."""
    return bad() if RANK == rank % WORLD else ok()


def bad_cpd_ratio():
    import edfkern.distributed as ED
    x, r, _, sl = _data()
    s = x.flatten()[sl.start * 6:sl.stop * 6]
    return ED.cpd_trajectory_loss(s, s * 0, s * 0 + 1, drop_ratio=1.5 if RANK == 0 else 0.375, process_group=PG)


def _steps():
    """name -> list of (kind, fn, words): kind ``err`` or ``val``."""
    import torch
    import edfkern.distributed as ED
    P = {}
    # -- identity: ranks that call different ops (the error names both ops)
    pairs = [("local_covariance", "class_centralization_loss"), ("cpd_trajectory_loss", "cpd_keep_mask"),
             ("covariance_matching_loss", "mean_matching_loss"), ("local_covariance", "covariance_matching_loss"),
             ("mean_matching_loss", "class_centralization_loss"), ("cpd_trajectory_loss", "local_covariance"),
             ("reduce_class_stats", "cpd_keep_mask"), ("cpd_keep_mask", "mean_matching_loss")]
    for a, b in pairs:
        P[f"identity:{a}/{b}"] = [("err", lambda a=a, b=b: good(a if RANK == 0 else b), [a, b]),
                                  ("val", lambda: good("covariance_matching_loss", 1), []),
                                  ("val", lambda: good("cpd_trajectory_loss", 2), [])]
    # -- a local error on one rank, then the next call (must not pair with the others' previous one)
    x3 = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(99))  # same on every rank
    local = {
        "cpd drop_ratio=1.5": ("cpd_trajectory_loss", bad_cpd_ratio, ["drop_ratio"]),
        "cpd_keep_mask drop_ratio='a'": ("cpd_keep_mask", lambda: on(0, lambda: ED.cpd_keep_mask(
            torch.ones(3), "a", process_group=PG), lambda: ED.cpd_keep_mask(torch.ones(3), 0.5, process_group=PG)),
            ["drop_ratio"]),
        "CM syn not a tensor": ("covariance_matching_loss", lambda: on(-1, lambda: ED.covariance_matching_loss(
            [1.0], x3, syn_groups=2, real_groups=2, process_group=PG), lambda: ED.covariance_matching_loss(
            x3, x3, syn_groups=2, real_groups=2, process_group=PG)), ["syn"]),
        "local_cov float labels": ("local_covariance", lambda: ED.local_covariance(
            x3, groups=torch.tensor([0, 1, 0, 1]) + (0.5 if RANK == 0 else 0), process_group=PG), ["integer dtype"]),
        "CC weight=nan": ("class_centralization_loss", lambda: ED.class_centralization_loss(
            x3.flatten(1), groups=2, weight=float("nan") if RANK == WORLD - 1 else 0.1, process_group=PG),
            ["weight"]),
        "DM wrong ndim": ("mean_matching_loss", lambda: on(0, lambda: ED.mean_matching_loss(
            torch.ones(4), torch.ones(4), syn_groups=2, real_groups=2, process_group=PG),
            lambda: ED.mean_matching_loss(x3.flatten(1), x3.flatten(1), syn_groups=2, real_groups=2, process_group=PG)),
            ["syn"]),
        "CM dtype syn!=real": ("covariance_matching_loss", lambda: ED.covariance_matching_loss(
            x3, x3.float() if RANK == 0 else x3, syn_groups=2, real_groups=2, process_group=PG), ["dtype"]),
        "local_cov num_groups=0": ("local_covariance", lambda: ED.local_covariance(
            x3, groups=torch.tensor([0, 1, 0, 1]), num_groups=0 if RANK == 1 else 2, process_group=PG),
            ["num_groups"]),
        "CC groups=-2": ("class_centralization_loss", lambda: ED.class_centralization_loss(
            x3.flatten(1), groups=-2 if RANK == 0 else 2, process_group=PG), ["groups"]),
        "local_cov missing groups": ("local_covariance", lambda: on(0, lambda: ED.local_covariance(
            x3, process_group=PG), lambda: ED.local_covariance(x3, groups=2, process_group=PG)), ["groups"]),
        "reduce_class_stats sums not a tensor": ("reduce_class_stats", lambda: on(-1, lambda: ED.reduce_class_stats(
            [1.0], torch.ones(1), group=PG), lambda: ED.reduce_class_stats(torch.ones(1), torch.ones(1), group=PG)),
            ["sums"]),
        "CM labels wrong length": ("covariance_matching_loss", lambda: ED.covariance_matching_loss(
            x3, x3, syn_groups=torch.tensor([0, 1, 0, 1, 1][:5 if RANK == 0 else 4]), real_groups=2,
            process_group=PG), ["shape"]),
    }
    for name, (op, fn, words) in local.items():
        P[f"local-then-next:{name}"] = [("err", fn, words), ("val", lambda op=op: good(op, 3), []),
                                        ("val", lambda op=op: good(op, 4), [])]
    # -- checks that ran after the header on one rank only
    def lab_vs_int(op):
        big = torch.tensor([0, 1, 0, 5])
        if op == "local_covariance":
            return ED.local_covariance(x3, groups=big if RANK == 1 else 2, num_groups=2, process_group=PG)
        if op == "class_centralization_loss":
            return ED.class_centralization_loss(x3.flatten(1), groups=big if RANK == 1 else 2, num_groups=2,
                                                process_group=PG)
        if op == "mean_matching_loss":
            return ED.mean_matching_loss(x3.flatten(1), x3.flatten(1), syn_groups=2,
                                         real_groups=big if RANK == 1 else 2, num_groups=2, process_group=PG)
        return ED.covariance_matching_loss(x3, x3, syn_groups=big if RANK == 1 else 2, real_groups=2,
                                           process_group=PG)
    for op in ("local_covariance", "class_centralization_loss", "mean_matching_loss", "covariance_matching_loss"):
        P[f"after-header:label out of range vs int groups ({op})"] = [
            ("err", lambda op=op: lab_vs_int(op), ["rank 1"]), ("val", lambda op=op: good(op, 5), [])]
    K = 70_000

    def big_k(total_ok: bool):
        n = K if RANK == 0 else 2
        if not total_ok:
            n = 2 if RANK else 3
        x = torch.randn(n, 1, 1, dtype=torch.float64)
        y = torch.arange(n) % K
        sig = ED.local_covariance(x, groups=y, num_groups=K, process_group=PG)
        return (sig.shape[0] == K) * torch.ones(1), torch.ones(1)
    P["after-header:K>65536 with K rows on one rank only"] = [("val", lambda: big_k(True), []),
                                                              ("val", lambda: good("local_covariance", 6), [])]
    P["after-header:K>65536 and K > total rows"] = [("err", lambda: big_k(False), ["70000"]),
                                                    ("val", lambda: good("local_covariance", 6), [])]
    # -- messages: scalar mismatches print values
    P["message:weight 0.1 vs 0.2"] = [("err", lambda: ED.class_centralization_loss(
        x3.flatten(1), groups=2, weight=0.1 if RANK == 0 else 0.2, process_group=PG), ["0.1", "0.2"]),
        ("val", lambda: good("class_centralization_loss", 7), [])]
    P["message:drop_ratio 0.25 vs 0.5"] = [("err", lambda: ED.cpd_keep_mask(
        torch.ones(4), 0.25 if RANK == 0 else 0.5, process_group=PG), ["0.25", "0.5"]),
        ("val", lambda: good("cpd_keep_mask", 7), [])]
    P["message:CM weight 1e-3 vs 1e-2"] = [("err", lambda: ED.covariance_matching_loss(
        x3, x3, syn_groups=2, real_groups=2, weight=1e-3 if RANK else 1e-2, process_group=PG), ["0.001", "0.01"]),
        ("val", lambda: good("mean_matching_loss", 7), [])]
    # -- a call interrupted before its header on rank 0 (a BaseException the op cannot send)
    class Interrupting(float):
        def __float__(self):
            raise KeyboardInterrupt

    def interrupted():
        if RANK == 0:
            try:
                ED.cpd_trajectory_loss(x3.flatten(), x3.flatten(), x3.flatten(), drop_ratio=Interrupting(0.5),
                                       process_group=PG)
            except KeyboardInterrupt:
                return None
            raise AssertionError("no interrupt")
        return good("cpd_trajectory_loss", 8)
    P["out-of-step:interrupted call on rank 0"] = [("behind", interrupted, ["out of step"]),
                                                   ("val", lambda: good("cpd_trajectory_loss", 9), []),
                                                   ("val", lambda: good("covariance_matching_loss", 9), [])]
    # -- more than one thing wrong at once
    P["several:two ranks fail their checks differently"] = [("err", lambda: ED.cpd_trajectory_loss(
        *(([1.0] if RANK == 1 else x3.flatten()),) * 3, drop_ratio=1.5 if RANK == 0 else 0.5, process_group=PG),
        ["rank 0: drop_ratio", "rank 1: student"]), ("val", lambda: good("cpd_keep_mask", 10), [])]
    P["several:local error and a different op"] = [("err", lambda: bad_cpd_ratio() if RANK == 0 else
                                                     good("local_covariance", 11), ["different edfkern ops"]),
                                                   ("val", lambda: good("local_covariance", 12), [])]
    long_type = type("L" * 3000, (), {})
    P["several:a 3000-character message"] = [("err", lambda: ED.local_covariance(
        x3, groups=long_type() if RANK == 0 else 2, process_group=PG), ["rank 0", "LLLL"]),
        ("val", lambda: good("local_covariance", 13), [])]
    P["several:num_groups=10**30 on one rank"] = [("err", lambda: ED.local_covariance(
        x3, groups=torch.tensor([0, 1, 0, 1]), num_groups=10**30 if RANK == 0 else 2, process_group=PG),
        ["rank 0"]), ("val", lambda: good("local_covariance", 14), [])]
    P["several:numel=10**30 on one rank"] = [("err", lambda: ED.cpd_keep_mask(
        torch.ones(4), 0.5, numel=10**30 if RANK == 0 else 4 * WORLD, process_group=PG), ["rank 0", "numel"]),
        ("val", lambda: good("cpd_keep_mask", 15), [])]
    P["several:numpy weight equal to a float weight"] = [("val", lambda: (ED.class_centralization_loss(
        x3.flatten(1), groups=2, weight=__import__("numpy").float64(0.25) if RANK else 0.25, process_group=PG),
        B_cc(x3, 0.25)), []), ("val", lambda: good("mean_matching_loss", 16), [])]
    # -- known limits: what a header cannot see
    P["limit:raw all_reduce_sum_ on one rank, an op on the other"] = [("err", lambda: ED.all_reduce_sum_(
        [torch.ones(3)], group=PG) if RANK == 0 else good("local_covariance", 17), ["edfkern"])]
    P["limit:process_group=None on one rank"] = [("err", lambda: ED.local_covariance(
        x3, groups=2, process_group=None if RANK == 0 else PG), ["process_group"])]
    return P


def B_cc(x3, w):
    """The union of every rank's identical x3 rows under CC with groups=2 on each rank."""
    import torch
    import edfkern.baselines as B
    lab = torch.tensor([0, 0, 1, 1] * WORLD)
    return B.class_centralization_loss(x3.flatten(1).repeat(WORLD, 1), groups=lab, weight=w)


def _run_step(kind: str, fn, words) -> dict:
    import torch
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "msg": str(e)[:600], "tb": traceback.format_exc()[-1500:]}
    if kind == "val" or (kind == "behind" and out is not None):
        got, exp = out
        ok = got.shape == exp.shape and torch.allclose(got.double(), exp.double(), rtol=1e-9, atol=1e-12)
        return {"value": float(got.double().sum()), "expected": float(exp.double().sum()), "correct": bool(ok)}
    return {"value": "returned"}


def rank_main(rank: int, world: int, out: str, probe: str) -> int:
    global RANK, WORLD, PG
    RANK, WORLD = rank, world
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=20))
    PG = dist.group.WORLD
    import edfkern.distributed as ED
    res = []
    for kind, fn, words in _steps()[probe]:
        res.append(_run_step(kind, fn, words))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    ED.shutdown()
    ED.exit_process(0)


# ----------------------------------------------------------------------------- driver

def run_probe(world: int, probe: str, steps, timeout_s: float = 6.0) -> tuple[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, EDFKERN_NO_NATIVE="1",
               EDFKERN_DIST_TIMEOUT=str(timeout_s), MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), str(world), out, probe], env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        deadline, logs, hung = time.monotonic() + 60, [], False
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            except subprocess.TimeoutExpired:
                hung = True
                p.kill()
                logs.append(p.communicate()[0])
        res = []
        for r in range(world):
            path = os.path.join(out, f"rank{r}.json")
            res.append(json.load(open(path)) if os.path.exists(path) else [])
    codes = [p.returncode for p in procs]
    for i, (kind, _, words) in enumerate(steps):
        got = [rr[i] if i < len(rr) else None for rr in res]
        if any(g is None for g in got):
            if hung:
                return "hang", f"step {i}: world passed its deadline"
            bad = [r for r, c in enumerate(codes) if c != 0]
            tail = logs[bad[0]].strip().splitlines()[-1:] if bad else [""]
            return "crash", f"step {i}: rank(s) {bad} exit {[codes[r] for r in bad]}: {tail[0][:160]}"
        if any("did not complete" in g.get("msg", "") for g in got):
            return "hang", f"step {i}: collective timed out: {next(g['msg'] for g in got if 'msg' in g)[:200]}"
        if kind == "behind":
            if got[0].get("raised") or any(g.get("raised") != "ValueError" or not all(w in g["msg"] for w in words)
                                           for g in got[1:]):
                return ("wrong" if any("value" in g for g in got[1:]) else "unclear"), f"step {i}: {got}"[:400]
            continue
        if kind == "val":
            wrong = [(r, g) for r, g in enumerate(got) if not g.get("correct")]
            if wrong:
                r, g = wrong[0]
                what = g.get("msg") or f"{g['value']!r} != {g['expected']!r}"
                outcome = "wrong" if "correct" in g else "unclear"
                return outcome, f"step {i} rank {r}: {g.get('raised', '')} {what[:300]}"
            continue
        raised = [g.get("raised") for g in got]
        if not all(raised):
            return "one-rank", f"step {i}: raised {raised}"
        for r, g in enumerate(got):
            if g["raised"] not in ("ValueError", "TypeError") or not all(w in g["msg"] for w in words):
                return "unclear", f"step {i} rank {r}: {g['raised']}: {g['msg'][:300]}"
    return "held", ""


def _timeout_probes() -> dict[str, tuple[str, str]]:
    """EDFKERN_DIST_TIMEOUT values, one process each: import, then one collective in a world of 1."""
    code = ("import datetime, os, torch, torch.distributed as dist\n"
            "import edfkern.distributed as ED\n"
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:%d', rank=0, world_size=1,"
            " timeout=datetime.timedelta(seconds=20))\n"
            "try:\n    ED.all_reduce_sum_([torch.ones(1)], group=dist.group.WORLD)\n    print('RESULT ok')\n"
            "except Exception as e:\n    print('RESULT', type(e).__name__, str(e)[:300])\n"
            "try:\n    ED.shutdown(timeout=datetime.timedelta(seconds=5))\nexcept Exception:\n    pass\n"
            "ED.exit_process(0)\n")
    out = {}
    for v in ("abc", "-5", "0", "nan", "inf", "", "1e400", "30"):
        env = dict(os.environ, PYTHONPATH=ROOT, EDFKERN_NO_NATIVE="1", EDFKERN_DIST_TIMEOUT=v)
        try:
            p = subprocess.run([sys.executable, "-c", code % free_port()], env=env, capture_output=True, text=True,
                               timeout=40)
            txt = p.stdout + p.stderr
            line = next((ln for ln in txt.splitlines() if ln.startswith("RESULT")), "")
            good_value = v in ("30", "")
            if good_value:
                out[f"timeout:{v!r}"] = ("held", "") if line == "RESULT ok" else ("unclear", txt[-300:])
            elif "EDFKERN_DIST_TIMEOUT" in line and "ValueError" in line:
                out[f"timeout:{v!r}"] = ("held", "")
            elif "Traceback" in txt and not line:
                out[f"timeout:{v!r}"] = ("crash", txt.strip().splitlines()[-1][:200])
            else:
                out[f"timeout:{v!r}"] = ("unclear" if line != "RESULT ok" else "wrong", (line or txt)[-200:])
        except subprocess.TimeoutExpired:
            out[f"timeout:{v!r}"] = ("hang", "no answer in 40 s")
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        return rank_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    sizes = [int(sys.argv[1])] if len(sys.argv) > 1 else [2, 3]
    filt = sys.argv[2] if len(sys.argv) > 2 else ""
    global WORLD
    table: dict[str, list[int]] = {}
    details = []
    for w in sizes:
        WORLD = w
        for name, steps in _steps().items():
            if not any(f in name for f in filt.split(",")):
                continue
            t0 = time.monotonic()
            outcome, why = run_probe(w, name, steps)
            cls = name.split(":")[0]
            row = table.setdefault(cls, [0, 0, 0])
            row[0] += 1
            row[1 if outcome == "held" else 2] += 1
            details.append(f"W={w} {outcome:8s} {name} ({time.monotonic() - t0:.0f} s) {why}")
            print(details[-1], flush=True)
    if not filt or "timeout" in filt:
        for name, (outcome, why) in _timeout_probes().items():
            row = table.setdefault("timeout", [0, 0, 0])
            row[0] += 1
            row[1 if outcome == "held" else 2] += 1
            print(f"      {outcome:8s} {name} {why}", flush=True)
    print("\nclass: tried / held / failed")
    for cls, (t, h, f) in table.items():
        print(f"{cls}: {t} / {h} / {f}")
    print(f"total: {sum(r[0] for r in table.values())} / {sum(r[1] for r in table.values())} / "
          f"{sum(r[2] for r in table.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
