"""edfkern.compdd.score under torch.distributed: 2 spawned gloo ranks give one process's result.

7 images over 2 ranks: DistributedSampler pads rank 1's shard with a duplicate of image 0,
which must not be counted. Each rank also writes its own checkpoint and its rows of one
shared maps file. Every process has a wall-clock bound and every collective a timeout.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import traceback

import pytest
import torch

import edfkern.compdd as compdd
import edfkern.distributed
from edfkern.compdd._cli import TensorImages
from tests._dist_launch import free_port
from tests._models import MODEL_MODULE
from tests.test_compdd import make_data, small_model  # the single-process tests' model and data

WORLD = 2
LAYERS = ["layer1", "layer2", "layer3"]


def _setup(n: int = 7):
    ds = make_data(n=n)
    ds.images[3] = float("nan")  # on rank 1: the other rank learns of it through the final gather
    return small_model(), ds


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["EDFKERN_DIST_TIMEOUT"] = "60"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        model, ds = _setup()
        res = compdd.score(model, ds, layers=LAYERS, batch_size=2, checkpoint=os.path.join(out_dir, "ck.pt"),
                           save_maps=os.path.join(out_dir, "maps.npy"), progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            f.write(res.to_json())
        edfkern.distributed.shutdown()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    edfkern.distributed.exit_process(0)  # os._exit after shutdown: torch's gloo finalization may abort


def _run_ranks(target, out_dir) -> list:
    """Spawn ``target(rank, port, out_dir)`` on WORLD ranks and wait for them, at most 240 s each (then the
    ranks are killed and the test fails, with what the ranks wrote to ``rank*.err``); the processes."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, str(out_dir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=240)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(5)
    errors = {f.name: f.read_text() for f in out_dir.glob("rank*.err")}
    assert not hung, f"ranks did not finish within the bound; errors: {errors}"
    return procs


def test_two_ranks_equal_one_process(tmp_path):
    procs = _run_ranks(_worker, tmp_path)
    errors = {f.name: f.read_text() for f in tmp_path.glob("rank*.err")}
    assert not errors and all(p.exitcode == 0 for p in procs), errors

    model, ds = _setup()
    with pytest.warns(compdd.NonFiniteImagesWarning, match=r"1 of 7 images .* \[3\]"):
        single = compdd.score(model, ds, layers=LAYERS, batch_size=3, progress=False)
    for r in range(WORLD):
        res = compdd.ComplexityResult.from_json(tmp_path / f"rank{r}.json")
        assert res.counts.tolist() == single.counts.tolist()  # the padded duplicate is not counted
        assert int(res.counts.sum()) == len(ds) - 1 == 6 and res.nonfinite == single.nonfinite == [3]
        torch.testing.assert_close(res.complexity, single.complexity, rtol=0, atol=1e-12)
        assert res.config["world_size"] == WORLD
    # per-rank checkpoints of each rank's shard (rank 0: images 0, 2, 4, 6; rank 1: 1, 3, 5)
    done = [torch.load(tmp_path / f"ck.rank{r}-of-{WORLD}.pt", weights_only=True)["done"] for r in range(WORLD)]
    assert done == [4, 3]
    maps = compdd.load_maps(tmp_path / "maps.npy")
    rows = [i for i in range(len(ds)) if i != 3]  # every finite image's row written once; image 3's stays NaN
    assert all(not torch.isnan(torch.from_numpy(maps[n][rows].copy())).any() for n in LAYERS)
    assert all(torch.isnan(torch.from_numpy(maps[n][3].copy())).all() for n in LAYERS)
    assert json.loads((tmp_path / "maps.npy.json").read_text())["layers"] == LAYERS


def _refusing_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    model, ds = _setup()
    try:
        compdd.score(model, ds, layers=LAYERS, batch_size=2, checkpoint=os.path.join(out_dir, "ck.pt"),
                     progress=False)
        outcome = "scored"
    except BaseException as e:  # noqa: BLE001  (the outcome is the test's subject)
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.outcome"), "w") as f:
        f.write(outcome)
    edfkern.distributed.shutdown()
    edfkern.distributed.exit_process(0)


def test_one_rank_refusing_stops_every_rank_before_scoring(tmp_path, monkeypatch):
    """Issue 20, class 2 under torchrun: rank 1 cannot write its checkpoint (the path is a folder). It used
    to score and fail at its first save while rank 0 waited for the whole collective timeout in the final
    all-reduce; now both raise ``ValueError`` before the first image, rank 0 naming rank 1."""
    import time

    monkeypatch.setenv("EDFKERN_DIST_TIMEOUT", "90")  # read by the spawned ranks at import
    os.makedirs(tmp_path / f"ck.rank1-of-{WORLD}.pt")
    t0 = time.monotonic()
    _run_ranks(_refusing_worker, tmp_path)
    outcome = [(tmp_path / f"rank{r}.outcome").read_text() for r in range(WORLD)]
    assert outcome[1].startswith("ValueError: checkpoint") and "is a folder" in outcome[1], outcome
    assert outcome[0] == "ValueError: compdd setup: rank(s) [1] refused the run (their error is on their stderr)", \
        outcome
    assert not (tmp_path / f"ck.rank0-of-{WORLD}.pt").exists()  # rank 0 scored nothing
    assert time.monotonic() - t0 < 90  # nobody waited for the collective timeout


def test_cli_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 -m edfkern.compdd score ...`` writes one process's result."""
    import subprocess
    import sys

    (tmp_path / "compdd_test_models.py").write_text(MODEL_MODULE)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(9, 3, 8, 8, generator=g), torch.tensor([0, 1, 2] * 3)
    torch.save({"images": images, "labels": labels}, tmp_path / "data.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]), OMP_NUM_THREADS="1",
               EDFKERN_DIST_TIMEOUT="60")
    args = ["score", "--data", str(tmp_path / "data.pt"), "--model", "compdd_test_models:build",
            "--layers", "layer1,layer2", "--batch-size", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "edfkern.compdd", *args,
           "--out", str(tmp_path / "dist")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "on 2 rank(s)" in p.stdout
    assert sorted(f.name for f in (tmp_path / "dist").glob("checkpoint*")) == [
        "checkpoint.rank0-of-2.pt", "checkpoint.rank1-of-2.pt"]
    sys.path.insert(0, str(tmp_path))
    import compdd_test_models

    single = compdd.score(compdd_test_models.build(), TensorImages(images, labels), layers=["layer1", "layer2"],
                          progress=False)
    res = compdd.ComplexityResult.from_json(tmp_path / "dist" / "complexity.json")
    assert res.counts.tolist() == single.counts.tolist() == [3, 3, 3]
    torch.testing.assert_close(res.complexity, single.complexity, rtol=0, atol=1e-12)
