"""Issue 20, class 2: "Comp-DD runs can mix data or die with a traceback".

Each test reproduces one example of the class on several inputs, through the CLI's ``main(argv)``
(in process, its exit code and stderr) and, for the whole entry point, ``python -m edfkern.compdd``
in a subprocess:

* ``--resume`` onto another dataset (same size; labels permuted; one image changed; another
  image size, ``--image-size`` or ``--subset``) is refused with one line naming what differs;
* truncated, empty or foreign ``--data`` files and checkpoints are one line and exit code 2;
* ``K`` is bounded before anything of size ``K`` is allocated;
* ``--out`` is checked writable, and the space for ``--save-maps`` reserved, before scoring;
* non-finite images are counted, listed and left out (all of them non-finite: exit code 2).

An input error is judged by :func:`one_line_error`: exit code 2, exactly one stderr line, no
traceback, and the words that name the problem.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import edfkern.compdd as compdd
from edfkern.compdd._cli import TensorImages, main
from tests._models import MODEL_MODULE

N = 8
LAYERS = "layer1,layer2"


def one_line_error(code: int, err: str, *words: str) -> str:
    """Exit code 2 and one stderr line without a traceback, holding every word; returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err and len(lines) == 1, f"not one line: {err}"
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    return lines[0]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``main(argv)`` in this process: ``(exit code, stdout, stderr)`` (argparse's exit counts as a return)."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def save_pt(path, images, labels) -> str:
    torch.save({"images": images, "labels": labels}, path)
    return str(path)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace: the model module on sys.path, ``d.pt`` (8 images, 3 classes), and a ``score`` helper."""
    (tmp_path / "edges_models.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("edges_models", None)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    save_pt(tmp_path / "d.pt", images, labels)

    class W:
        root = tmp_path

        @staticmethod
        def args(data, out, *extra, model="edges_models:build", layers=LAYERS):
            return ["score", "--data", str(data), "--model", model, "--layers", layers, "--out", str(out),
                    "--batch-size", "3", "--no-progress", *extra]

    W.images, W.labels, W.data = images, labels, str(tmp_path / "d.pt")
    return W


def classes_of(out) -> list:
    return [(c["count"], c["complexity"]) for c in json.loads((out / "complexity.json").read_text())["classes"]]


# ----------------------------------------------------------------------------- resume mixes datasets


def _variants(ws):
    g = torch.Generator().manual_seed(1)
    im, lab = ws.images, ws.labels
    changed = im.clone()
    changed[5] = -changed[5]
    return {
        "other images": (save_pt(ws.root / "v1.pt", torch.randn(N, 3, 8, 8, generator=g), lab), [], "images_sha256"),
        "labels permuted": (save_pt(ws.root / "v2.pt", im, lab[[1, 0, 2, 4, 3, 5, 7, 6]]), [], "labels_sha256"),
        "other histogram": (save_pt(ws.root / "v3.pt", im, torch.tensor([0] * 4 + [1, 2] * 2)), [], "label_counts"),
        "one image changed": (save_pt(ws.root / "v4.pt", changed, lab), [], "images_sha256"),
        "16 px images": (save_pt(ws.root / "v5.pt", torch.randn(N, 3, 16, 16, generator=g), lab), [], "image_shape"),
        "--image-size": (ws.data, ["--image-size", "112"], "image_size"),
    }


def test_class2_resume_refuses_another_dataset_after_a_finished_run(ws, capsys):
    ref = ws.root / "ref"
    assert cli(capsys, *ws.args(ws.data, ref))[0] == 0
    before = classes_of(ref)
    for name, (data, extra, what) in _variants(ws).items():
        out = ws.root / f"o-{name}"
        shutil.copytree(ref, out)
        code, _, err = cli(capsys, *ws.args(data, out, "--resume", *extra))
        line = one_line_error(code, err, "another configuration or dataset", what)
        assert line.startswith("error: resume:"), name
        assert classes_of(out) == before, name  # the old numbers were not rewritten under the new data's name
    # the controls: the same data resumes, with any batch size
    for extra in ([], ["--batch-size", "5"]):
        code, _, err = cli(capsys, *ws.args(ws.data, ref, "--resume", *extra))
        assert code == 0, err
        assert classes_of(ref) == before


def test_class2_resume_refuses_another_dataset_after_an_interruption(ws, capsys, monkeypatch):
    part = ws.root / "part"
    monkeypatch.setenv("EDGES_FAIL_AFTER_FORWARDS", "4")  # the probe, then some passes of the first batches
    with pytest.raises(RuntimeError, match="simulated preemption"):
        main(ws.args(ws.data, part, "--checkpoint-every", "1"))
    monkeypatch.delenv("EDGES_FAIL_AFTER_FORWARDS")
    done = torch.load(part / "checkpoint.pt", weights_only=True)["done"]
    assert 0 < done < N  # a partial checkpoint: resuming would add the other data's images to it
    capsys.readouterr()
    for name, (data, extra, what) in _variants(ws).items():
        out = ws.root / f"o-{name}"
        shutil.copytree(part, out)
        one_line_error(*cli(capsys, *ws.args(data, out, "--resume", *extra))[::2], what)
        assert not (out / "complexity.json").exists()
    for name, extra, what in [("model", [], "model"), ("seed", ["--seed", "3"], "noise"),
                              ("non-strict", ["--non-strict"], "strict")]:
        out = ws.root / f"o-{name}"
        shutil.copytree(part, out)
        model = "edges_models:other_weights" if name == "model" else "edges_models:build"
        one_line_error(*cli(capsys, *ws.args(ws.data, out, "--resume", *extra, model=model))[::2], what)
    fresh = ws.root / "fresh"
    assert cli(capsys, *ws.args(ws.data, fresh))[0] == 0
    assert cli(capsys, *ws.args(ws.data, part, "--resume"))[0] == 0
    assert classes_of(part) == classes_of(fresh)  # the control: same data, resumed = one run


def test_class2_resume_refuses_another_subset(ws, capsys):
    easy, hard = compdd.classes("fish_easy"), compdd.classes("fish_hard")
    labels = torch.tensor(easy + hard)  # both subsets: 10 images each, one per class, same histogram
    data = save_pt(ws.root / "inet.pt", torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                   labels)
    out = ws.root / "o"
    args = ws.args(data, out, model="edges_models:build10")
    assert cli(capsys, *args, "--subset", "fish_easy")[0] == 0
    one_line_error(*cli(capsys, *args, "--resume", "--subset", "fish_hard")[::2], "subset", "images_sha256")


def test_class2_resume_api_names_what_differs(tmp_path):
    from tests._models import staged_convnet

    model = staged_convnet(3, (4, 4, 4), seed=0)
    g = torch.Generator().manual_seed(0)
    ds = TensorImages(torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2] * 2))
    ck = tmp_path / "ck.pt"
    compdd.score(model, ds, layers=["layer1"], checkpoint=ck, progress=False, method="gradcam")
    other = TensorImages(ds.images.flip(0), ds.targets)
    with pytest.raises(ValueError, match="images_sha256") as e:
        compdd.score(model, other, layers=["layer1"], resume=ck, progress=False, method="gradcam")
    assert "labels_sha256" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="image_size: checkpoint None, this call 8"):
        compdd.score(model, ds, layers=["layer1"], resume=ck, progress=False, method="gradcam", tags={"image_size": 8})
    v1 = torch.load(ck, weights_only=True)
    v1["version"] = 1  # a checkpoint of the format before the fingerprint
    torch.save(v1, tmp_path / "v1.pt")
    with pytest.raises(ValueError, match="version 1 checkpoint"):
        compdd.score(model, ds, layers=["layer1"], resume=tmp_path / "v1.pt", progress=False, method="gradcam")


# ----------------------------------------------------------------------------- unreadable files


def _bad_data_files(ws) -> dict:
    root = ws.root
    good = open(ws.data, "rb").read()
    np.savez(root / "good.npz", images=ws.images.numpy(), labels=ws.labels.numpy())
    npz = (root / "good.npz").read_bytes()
    blobs = {"empty.pt": b"", "truncated.pt": good[: len(good) // 2], "random.pt": os.urandom(3000),
             "text.pt": b'{"images": []}\n', "empty.npz": b"", "truncated.npz": npz[: len(npz) // 2],
             "random.npz": os.urandom(3000)}
    for name, blob in blobs.items():
        (root / name).write_bytes(blob)
    with open(root / "foreign.pt", "wb") as f:
        pickle.dump({"images": {1, 2}, "labels": range(3)}, f)  # classes weights_only refuses
    np.save(root / "single.npy", ws.images.numpy())
    os.rename(root / "single.npy", root / "single.npz")
    with zipfile.ZipFile(root / "damaged.npz", "w") as z:
        z.writestr("images.npy", b"\x93NUMPY" + b"\0" * 64)
        z.writestr("labels.npy", b"garbage")
    np.savez(root / "int_images.npz", images=ws.images.numpy().astype(np.int16), labels=ws.labels.numpy())
    save_pt(root / "one_channel.pt", ws.images[:, :1], ws.labels)  # the model takes 3 channels
    torch.save({"images": ws.images.to(torch.uint8), "labels": ws.labels}, root / "uint8.pt")
    return {name: str(root / name) for name in list(blobs) + ["foreign.pt", "single.npz", "damaged.npz",
                                                              "int_images.npz", "one_channel.pt", "uint8.pt"]}


def test_class2_unreadable_data_files_are_one_line(ws, capsys):
    for name, path in _bad_data_files(ws).items():
        out = ws.root / f"o-{name}"
        code, _, err = cli(capsys, *ws.args(path, out))
        one_line_error(code, err, "--data" if name != "one_channel.pt" else "the model cannot take")
        assert not out.exists() or not os.listdir(out), name  # nothing written


def test_class2_unreadable_checkpoints_are_one_line(ws, capsys):
    ref = ws.root / "ref"
    assert cli(capsys, *ws.args(ws.data, ref))[0] == 0
    good = (ref / "checkpoint.pt").read_bytes()
    state = torch.load(ref / "checkpoint.pt", weights_only=True)
    cases = {"empty": b"", "truncated": good[: len(good) // 2], "cut at the end": good[:-30],
             "random bytes": os.urandom(2000), "an npz": (ws.root / "d.pt").read_bytes()[:100]}
    torch_objects = {"a tensor": torch.zeros(3), "no version": {"done": 1}, "version 1": dict(state, version=1),
                     "sums of another shape": dict(state, sums=torch.zeros(7, 1, dtype=torch.float64)),
                     "done beyond the data": dict(state, done=10 ** 6), "done negative": dict(state, done=-1),
                     "nonfinite index out of range": dict(state, nonfinite=torch.tensor([99]))}
    for name, content in list(cases.items()) + list(torch_objects.items()):
        out = ws.root / f"o-{name}"
        out.mkdir()
        if isinstance(content, bytes):
            (out / "checkpoint.pt").write_bytes(content)
        else:
            torch.save(content, out / "checkpoint.pt")
        line = one_line_error(*cli(capsys, *ws.args(ws.data, out, "--resume"))[::2], "checkpoint")
        assert not (out / "complexity.json").exists(), (name, line)
    out = ws.root / "o-folder"
    (out / "checkpoint.pt").mkdir(parents=True)
    one_line_error(*cli(capsys, *ws.args(ws.data, out, "--resume"))[::2], "is a folder")


def test_class2_damaged_maps_file_on_resume(ws, capsys, monkeypatch):
    part = ws.root / "part"
    monkeypatch.setenv("EDGES_FAIL_AFTER_FORWARDS", "4")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        main(ws.args(ws.data, part, "--checkpoint-every", "1", "--save-maps"))
    monkeypatch.delenv("EDGES_FAIL_AFTER_FORWARDS")
    capsys.readouterr()
    whole = (part / "maps.npy").read_bytes()
    for name, blob in [("truncated", whole[: len(whole) // 2]), ("empty", b""), ("header only", whole[:128]),
                       ("random", os.urandom(len(whole)))]:
        out = ws.root / f"o-{name}"
        shutil.copytree(part, out)
        (out / "maps.npy").write_bytes(blob)
        one_line_error(*cli(capsys, *ws.args(ws.data, out, "--resume", "--save-maps"))[::2], "maps")
        assert (out / "maps.npy").stat().st_size == len(blob)  # not extended under the damage


def test_class2_entry_point_prints_one_line(ws):
    """``python -m edfkern.compdd`` end to end: no traceback from the interpreter either."""
    files = _bad_data_files(ws)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ws.root), root]), EDFKERN_NO_NATIVE="1")
    for data in (files["truncated.pt"], files["empty.npz"], files["foreign.pt"]):  # foreign: torch warns too
        p = subprocess.run([sys.executable, "-m", "edfkern.compdd", *ws.args(data, ws.root / "o")], env=env,
                           capture_output=True, text=True, timeout=300)
        one_line_error(p.returncode, p.stderr, "--data")


# ----------------------------------------------------------------------------- K


def test_class2_k_bounded_before_allocation(ws, capsys):
    for bad, words in [(2 ** 62, ["at most 65536", "index 3"]), (compdd.MAX_CLASSES, ["65537 classes", "index 3"]),
                       (10 ** 6, ["at most 65536"]), (-1, [">= 0", "index 3"]), (-(2 ** 62), [">= 0"])]:
        labels = ws.labels.clone()
        labels[3] = bad
        out = ws.root / f"o{bad}"
        one_line_error(*cli(capsys, *ws.args(save_pt(ws.root / "k.pt", ws.images, labels), out,
                                             "--checkpoint-every", "1"))[::2], *words)
        assert not (out / "checkpoint.pt").exists()  # refused before the first batch
    labels = ws.labels.clone()
    labels[3] = compdd.MAX_CLASSES - 1  # the bound itself is allowed
    ds = TensorImages(ws.images.double(), labels)
    import edges_models

    res = compdd.score(edges_models.build(), ds, layers=["layer1"], method="gradcam", progress=False)
    assert res.num_classes == compdd.MAX_CLASSES and int(res.counts.sum()) == N


def test_class2_k_of_1e9_under_a_memory_cap(ws):
    """One label of 10**9 used to allocate K x layers float64 (16 GB here) before any check: under a 3 GiB
    address-space cap the process must still exit 2 with one line."""
    resource = pytest.importorskip("resource")
    labels = ws.labels.clone()
    labels[5] = 10 ** 9
    data = save_pt(ws.root / "k9.pt", ws.images, labels)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ws.root), root]), EDFKERN_NO_NATIVE="1")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    p = subprocess.run([sys.executable, "-m", "edfkern.compdd", *ws.args(data, ws.root / "o")], env=env,
                       capture_output=True, text=True, timeout=300, preexec_fn=cap)
    one_line_error(p.returncode, p.stderr, "1000000001 classes", "at most 65536", "index 5")


# ----------------------------------------------------------------------------- --out and the disk


def test_class2_out_checked_before_scoring(ws, capsys, monkeypatch):
    (ws.root / "a_file").write_text("x")
    one_line_error(*cli(capsys, *ws.args(ws.data, ws.root / "a_file"))[::2], "--out", "is a file")
    one_line_error(*cli(capsys, *ws.args(ws.data, ws.root / "a_file" / "sub"))[::2], "--out", "cannot create")
    import importlib.util

    plot = [("complexity.png", ["--plot"])] if importlib.util.find_spec("matplotlib") else []
    for name, extra in [("complexity.json", []), ("complexity.csv", []), ("checkpoint.pt", []),
                        ("maps.npy", ["--save-maps"]), ("maps.npy.json", ["--save-maps"])] + plot:
        out = ws.root / f"o-{name}"
        (out / name).mkdir(parents=True)
        one_line_error(*cli(capsys, *ws.args(ws.data, out, *extra))[::2], "is a folder")
        assert sorted(os.listdir(out)) == [name]  # nothing scored, nothing written

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = ws.root / "ro"
    one_line_error(*cli(capsys, *ws.args(ws.data, out))[::2], "--out", "Read-only file system")
    assert os.listdir(out) == []


def test_class2_full_disk_checked_before_scoring(ws, capsys, monkeypatch):
    from edfkern.compdd import _storage

    free = {"bytes": 0}
    monkeypatch.setattr(_storage, "free_bytes", lambda folder: free["bytes"])
    out = ws.root / "full"
    one_line_error(*cli(capsys, *ws.args(ws.data, out))[::2], "checkpoint", "free")
    assert not (out / "checkpoint.pt").exists()
    # the maps need 8 x (64 + 16) float32 (+ header): a figure that holds the checkpoint but not the maps
    free["bytes"] = _storage.SLACK + _storage.checkpoint_bytes(3, 2, N) + _storage.maps_bytes(N, {"pixels": 80}) - 1
    one_line_error(*cli(capsys, *ws.args(ws.data, out, "--save-maps"))[::2], "save_maps", "free")
    assert not (out / "maps.npy").exists()
    assert cli(capsys, *ws.args(ws.data, out))[0] == 0  # the same figure is enough without the maps
    free["bytes"] += 1
    assert cli(capsys, *ws.args(ws.data, ws.root / "fits", "--save-maps"))[0] == 0


def test_class2_maps_space_reserved_up_front(ws, capsys, monkeypatch):
    """A full disk under the memory map used to kill the run with SIGBUS; the bytes are now reserved with
    posix_fallocate first, so ENOSPC (or a quota) is one line and no maps file is left behind."""
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform: the free-space check stands alone")
    calls = []

    def no_space(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    for out in (ws.root / "a", ws.root / "b"):
        one_line_error(*cli(capsys, *ws.args(ws.data, out, "--save-maps"))[::2], "cannot reserve",
                       "No space left on device")
        assert not (out / "maps.npy").exists() and not (out / "checkpoint.pt").exists()
    assert calls and all(c >= 4 * N * 80 for c in calls)  # the whole file, not a sparse end byte
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(ws.root))
    assert cli(capsys, *ws.args(ws.data, ws.root / "ok", "--save-maps"))[0] == 0
    maps = compdd.load_maps(ws.root / "ok" / "maps.npy")
    assert all(np.isfinite(m).all() for m in maps.values())


def test_class2_checkpoint_write_failing_mid_run_is_one_line(ws, capsys, monkeypatch):
    from edfkern.compdd import _storage

    def disk_full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nmore lines")

    monkeypatch.setattr(_storage.torch, "save", disk_full)
    out = ws.root / "o"
    line = one_line_error(*cli(capsys, *ws.args(ws.data, out, "--checkpoint-every", "1"))[::2], "checkpoint",
                          "file write failed")
    assert "more lines" not in line and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------- non-finite images


@pytest.mark.parametrize("bad,fill", [([4], "nan"), ([0, 5, 7], "nan"), ([3], "+inf"), ([6], "-inf"),
                                      ([2], "half nan")])
def test_class2_nonfinite_images_reported_and_left_out(ws, capsys, bad, fill):
    x = ws.images.clone()
    for i in bad:
        if fill == "nan":
            x[i] = float("nan")
        elif fill == "half nan":
            x[i, :, :4] = float("nan")
        else:
            x[i, 0, 2, 3] = float(fill.replace("+", ""))
    keep = [i for i in range(N) if i not in bad]
    out, ref = ws.root / "o", ws.root / "ref"
    code, stdout, err = cli(capsys, *ws.args(save_pt(ws.root / "x.pt", x, ws.labels), out, "--method", "gradcam"))
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "Traceback" not in err
    assert f"{len(bad)} of {N} images are not finite" in lines[0]
    assert f"dataset indices [{', '.join(map(str, bad))}]" in lines[0]
    assert f"left out {len(bad)} non-finite" in stdout
    assert json.loads((out / "complexity.json").read_text())["nonfinite"] == bad
    # the scores are those of the finite images alone (gradcam: no per-index noise)
    assert cli(capsys, *ws.args(save_pt(ws.root / "f.pt", ws.images[keep], ws.labels[keep]), ref,
                                "--method", "gradcam"))[0] == 0
    assert classes_of(out) == classes_of(ref)


def test_class2_all_nonfinite_is_an_error(ws, capsys):
    for name, fill in [("all NaN", lambda x: x.fill_(float("nan"))),
                       ("one inf pixel each", lambda x: x[:, 1, 0, 0].fill_(float("inf"))),
                       ("NaN and -inf", lambda x: (x[:4].fill_(float("nan")), x[4:, 0].fill_(float("-inf"))))]:
        x = ws.images.clone()
        fill(x)
        out = ws.root / f"o-{name}"
        one_line_error(*cli(capsys, *ws.args(save_pt(ws.root / "x.pt", x, ws.labels), out))[::2],
                       f"all {N} images are not finite")
        assert not (out / "complexity.json").exists()


class _Exp(torch.nn.Module):
    def forward(self, x):
        return x.exp()


def test_class2_nonfinite_api_warning_maps_and_resume(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer1", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Exp()))  # overflows past ~709
    model.add_module("layer2", nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 3))
    model = model.double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 8, 8, generator=g, dtype=torch.float64)
    x[1] = float("nan")
    x[5] = 1e4  # finite, but the model overflows: its CAM maps are not finite
    ds = TensorImages(x, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    with pytest.warns(compdd.NonFiniteImagesWarning, match=r"2 of 7 images .* \[1, 5\]"):
        res = compdd.score(model, ds, layers=["layer1", "layer2"], batch_size=3, progress=False,
                           save_maps=tmp_path / "maps.npy", checkpoint=tmp_path / "ck.pt")
    assert res.nonfinite == [1, 5] and res.counts.tolist() == [3, 1, 1]
    maps = compdd.load_maps(tmp_path / "maps.npy")
    assert np.isnan(maps["layer1"][[1, 5]]).all() and np.isfinite(maps["layer1"][[0, 2, 3, 4, 6]]).all()
    assert compdd.ComplexityResult.from_json(res.to_json()).nonfinite == [1, 5]
    with pytest.warns(compdd.NonFiniteImagesWarning):  # the checkpoint keeps the list for a resumed run
        again = compdd.score(model, ds, layers=["layer1", "layer2"], resume=tmp_path / "ck.pt", progress=False)
    assert again.nonfinite == [1, 5] and torch.equal(again.counts, res.counts)


# ----------------------------------------------------------------------------- argument values


@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "0"], ["batch_size"]), (["--batch-size", "-2"], ["batch_size"]),
    (["--batch-size", "abc"], ["--batch-size"]), (["--num-workers", "-1"], ["--num-workers"]),
    (["--num-samples", "0"], ["num_samples"]), (["--std", "-1"], ["std"]), (["--std", "nan"], ["std"]),
    (["--threshold", "2"], ["threshold"]), (["--threshold", "nan"], ["threshold"]),
    (["--checkpoint-every", "0"], ["checkpoint_every"]), (["--seed", "-1"], ["seed"]),
    (["--image-size", "0"], ["--image-size"]), (["--device", "bogus"], ["--device"]),
    (["--device", "meta"], ["--device", "no meta device"]),
    (["--method", "scorecam"], ["--method"]), (["--unknown"], ["--unknown"]),
])
def test_class2_argument_errors_before_anything_is_written(ws, capsys, extra, words):
    out = ws.root / "o"
    one_line_error(*cli(capsys, *ws.args(ws.data, out, *extra))[::2], *words)
    assert not out.exists()


def test_class2_layers_and_model_errors(ws, capsys):
    for kw, words in [(dict(layers=",,"), ["--layers"]), (dict(layers=""), ["--layers"]),
                      (dict(model="a:b:c"), ["--model"]), (dict(model="no_such_module_x:f"), ["cannot import"])]:
        out = ws.root / "o"
        one_line_error(*cli(capsys, *ws.args(ws.data, out, **kw))[::2], *words)
        assert not out.exists()
    (ws.root / "broken_models.py").write_text("def f(:\n")
    one_line_error(*cli(capsys, *ws.args(ws.data, ws.root / "o", model="broken_models:f"))[::2], "SyntaxError")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf"])
def test_class2_bad_dist_timeout_is_one_line(ws, capsys, monkeypatch, tmp_path, value):
    """``EDFKERN_DIST_TIMEOUT`` is checked with the other arguments (it bounds torchrun's collectives)."""
    monkeypatch.setenv("EDFKERN_DIST_TIMEOUT", value)
    code, _, err = cli(capsys, *ws.args(ws.data, tmp_path / "out"))
    one_line_error(code, err, "EDFKERN_DIST_TIMEOUT")
    assert not (tmp_path / "out").exists()
