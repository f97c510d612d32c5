"""edfkern.compdd: the subsets as data, the subset loader, the scorer, its result and its CLI.

The scorer's oracle is a per-image, per-layer loop: one single-layer CAMExtractor per image
and layer (separate passes), given the same noise draws the scorer documents, thresholded
and averaged per class in plain Python. The model runs in float64.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import edfkern.compdd as compdd
from edfkern.cam import CAMExtractor
from tests._models import MODEL_MODULE, staged_convnet
from edfkern.compdd._cli import TensorImages, main

PUBLISHED = {  # the lists as the paper's table gives them, typed in again independently
    "fish_hard": [0, 391, 389, 395, 4, 396, 2, 394, 50, 103],
    "fish_easy": [5, 1, 6, 397, 390, 3, 392, 393, 148, 147],
    "music_hard": [420, 594, 420, 579, 402, 776, 486, 401, 546, 558],
    "round_easy": [417, 560, 953, 826, 426, 981, 430, 890, 746, 768],
}


# ----------------------------------------------------------------------------- the lists


def test_subset_lists():
    names = compdd.subsets()
    assert len(names) == 16 and names[0] == "birds_hard" and names[-1] == "music_easy"
    assert compdd.categories() == ("birds", "cars", "dogs", "fish", "snake", "insect", "round", "music")
    for cat in compdd.categories():
        assert f"{cat}_easy" in names and f"{cat}_hard" in names
    for name, cls in PUBLISHED.items():
        assert list(compdd.SUBSETS[name]) == cls
    for name in names:
        if name != "music_hard":
            got = compdd.classes(name)
            assert len(got) == 10 == len(set(got)) and all(0 <= c < 1000 for c in got)
    assert compdd.classes("fish_hard") == PUBLISHED["fish_hard"]


def test_music_hard_duplicate():
    with pytest.raises(ValueError) as e:
        compdd.classes("music_hard")
    msg = str(e.value)
    assert "class 420" in msg and "positions 0 and 2" in msg and "dedupe=True" in msg and "9 distinct" in msg
    assert compdd.classes("music_hard", dedupe=True) == [420, 594, 579, 402, 776, 486, 401, 546, 558]


def test_unknown_name_and_bad_classes():
    with pytest.raises(ValueError, match="Did you mean 'fish_hard'"):
        compdd.classes("fish_hrad")
    with pytest.raises(ValueError, match="unknown Comp-DD subset 'zzz'"):
        compdd.classes("zzz")
    ds = TensorImages(torch.zeros(3, 3, 4, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"1000 is not an ImageNet-1K class index"):
        compdd.subset(ds, [1, 1000])
    with pytest.raises(ValueError, match=r"-1 is not an ImageNet-1K class index"):
        compdd.subset(ds, [-1, 2])
    with pytest.raises(ValueError, match="at least one class"):
        compdd.subset(ds, [])
    with pytest.raises(ValueError, match="class 2 is listed 2 times"):
        compdd.subset(ds, [2, 1, 2])
    with pytest.raises(TypeError, match="must be an int"):
        compdd.subset(ds, [1.5, 2])


# ----------------------------------------------------------------------------- the loader


class LabelsOnly(torch.utils.data.Dataset):
    """A dataset with ``.targets`` whose ``__getitem__`` counts its calls (an image decode)."""

    def __init__(self, labels):
        self.targets = list(labels)
        self.calls = 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        self.calls += 1
        return torch.full((1,), float(i)), self.targets[i], f"extra{i}"


class Plain(torch.utils.data.Dataset):
    """(image, label) items and no ``.targets``."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1,), float(i)), self.labels[i]


def _imagenet_like_labels(seed=0, n=3000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (n,), generator=g).tolist() + list(range(1000)) * 2  # every class present


@pytest.mark.parametrize("name", ["fish_hard", "fish_easy"])
def test_collisions_one_mapping(name):
    labels = _imagenet_like_labels()
    base = LabelsOnly(labels)
    sub = compdd.subset(base, name)
    assert base.calls == 0  # labels came from .targets: no image was loaded to filter
    cls = compdd.classes(name)
    assert sub.classes == cls and sub.num_classes == 10 and sub.name == name
    expected = [i for i, t in enumerate(labels) if t in cls]
    assert sub.indices.tolist() == expected
    assert sub.targets.tolist() == [cls.index(labels[i]) for i in expected]  # listed order, one mapping
    for j in range(len(sub)):
        img, y, extra = sub[j]
        assert labels[int(img)] == cls[y]  # the item's true ImageNet class is the one its label names
        assert extra == f"extra{int(img)}"
    # no class merged, none empty: counts per label equal counts of the ImageNet class
    assert sub.class_counts() == [labels.count(c) for c in cls]
    for c, positions in enumerate(sub.class_index):
        assert positions and all(int(sub.targets[p]) == c for p in positions)
    assert base.targets == labels  # the base dataset was not relabelled


def test_duplicate_subset_and_dedupe():
    base = LabelsOnly(_imagenet_like_labels(1))
    with pytest.raises(ValueError, match="positions 0 and 2"):
        compdd.subset(base, "music_hard")
    sub = compdd.subset(base, "music_hard", dedupe=True)
    assert sub.num_classes == 9 and min(sub.class_counts()) > 0
    assert sorted(set(sub.targets.tolist())) == list(range(9))


def test_plain_dataset_and_torch_subset():
    labels = _imagenet_like_labels(2)
    plain = compdd.subset(Plain(labels), "fish_easy")
    with_targets = compdd.subset(LabelsOnly(labels), "fish_easy")
    assert torch.equal(plain.indices, with_targets.indices) and torch.equal(plain.targets, with_targets.targets)
    base = LabelsOnly(labels)
    keep = [i for i in range(len(labels)) if i % 3]  # every class keeps an image
    sub = compdd.subset(Subset(base, keep), "fish_easy")
    assert base.calls == 0  # read through the Subset from the base's .targets
    assert [labels[keep[int(i)]] for i in sub.indices] == [sub.classes[int(t)] for t in sub.targets]
    tens = compdd.subset(TensorImages(torch.zeros(len(labels), 1, 1, 1), torch.tensor(labels)), [5, 1, 6])
    assert tens.classes == [5, 1, 6] and tens.num_classes == 3


def test_labels_not_imagenet():
    relabelled = LabelsOnly([i % 10 for i in range(50)])  # already 0..9
    with pytest.raises(ValueError, match="none of the classes of 'birds_hard'"):
        compdd.subset(relabelled, "birds_hard")
    with pytest.raises(ValueError, match=r"classes \[391, 389, 395, 396, 394, 50, 103\] of 'fish_hard' have no"):
        compdd.subset(relabelled, "fish_hard")  # 0, 2, 4 present, the rest would be empty
    with pytest.raises(ValueError, match="found label 1000"):
        compdd.subset(LabelsOnly([3, 1000]), [3])


# ----------------------------------------------------------------------------- the scorer


def small_model(num_classes=4, seed=0):
    return staged_convnet(num_classes, (6, 8, 8), seed=seed)


LAYERS = ["layer1", "layer2", "layer3"]


def make_data(n=19, num_classes=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[:num_classes] = torch.arange(num_classes)  # every class present
    return TensorImages(images, labels)


def reference_scores(model, ds, threshold=0.5, strict=True, num_samples=4, std=0.3, seed=0, k=4):
    """Per image, per layer: a single-layer extractor's own passes, the documented noise."""
    sums = [[0.0] * len(LAYERS) for _ in range(k)]
    counts = [0] * k
    model.eval()
    for i in range(len(ds)):
        x, y = ds[i]
        x = x[None]
        pred = int(model(x).argmax(1))
        z = compdd.image_noise(torch.tensor([i]), x.shape[1:], num_samples, seed=seed, dtype=x.dtype)
        counts[y] += 1
        for j, name in enumerate(LAYERS):
            with CAMExtractor(model, name, num_samples=num_samples, std=std) as ex:
                m = ex(x, pred, noise=z)[0]
            above = (m > threshold) if strict else (m >= threshold)
            sums[y][j] += 1.0 - float(above.double().mean())
    return torch.tensor([[s / c for s in row] for row, c in zip(sums, counts)], dtype=torch.float64), counts


@pytest.fixture(scope="module")
def scored():
    model, ds = small_model(), make_data()
    return model, ds, compdd.score(model, ds, layers=LAYERS, batch_size=5, progress=False)


def test_score_equals_per_image_per_layer_reference(scored):
    model, ds, res = scored
    expected, counts = reference_scores(model, ds)
    assert res.layers == LAYERS and res.counts.tolist() == counts
    torch.testing.assert_close(res.complexity, expected, rtol=0, atol=1e-12)
    assert 0 < float(res.complexity.min()) and float(res.complexity.max()) < 1  # non-trivial maps


def test_score_threshold_and_not_strict():
    model, ds = small_model(), make_data(n=9)
    for thr, strict in [(0.3, False), (0.0, False), (1.0, True)]:
        res = compdd.score(model, ds, layers=LAYERS, threshold=thr, strict=strict, batch_size=4, progress=False)
        expected, _ = reference_scores(model, ds, threshold=thr, strict=strict)
        torch.testing.assert_close(res.complexity, expected, rtol=0, atol=1e-12)
    # >= 0 holds for every pixel: complexity 0; > 1 for none: complexity 1
    assert float(compdd.score(model, ds, layers=["layer2"], threshold=0.0, strict=False,
                              progress=False).complexity.abs().max()) == 0.0
    assert float(compdd.score(model, ds, layers=["layer2"], threshold=1.0, progress=False).complexity.min()) == 1.0


def test_score_independent_of_batching_and_loader(scored):
    model, ds, res = scored
    shuffled = DataLoader(ds, batch_size=7, shuffle=True)  # its sampler is replaced: indices drive the noise
    other = compdd.score(model, shuffled, layers=LAYERS, progress=False)
    torch.testing.assert_close(other.complexity, res.complexity, rtol=0, atol=1e-12)
    assert torch.equal(other.counts, res.counts)


def test_score_float32_model_and_modules_as_layers():
    model = small_model().float()
    ds = TensorImages(make_data().images.float(), make_data().targets)
    res = compdd.score(model, ds, layers=[model.layer1, model.layer3], progress=False)
    assert res.layers == ["layer1", "layer3"] and res.complexity.shape == (4, 2)
    assert torch.isfinite(res.complexity).all()


def test_resume_after_interruption(tmp_path, scored):
    model, ds, full = scored

    from torch.utils.data import default_collate

    batches = []

    def failing(items):  # the third batch of the scoring pass fails (single items are the scorer's own reads)
        if len(items) > 1:
            batches.append(len(items))
            if len(batches) == 3:
                raise RuntimeError("simulated preemption")
        return default_collate(items)

    ck = tmp_path / "ck.pt"
    with pytest.raises(RuntimeError, match="preemption"):
        compdd.score(model, DataLoader(ds, batch_size=5, collate_fn=failing), layers=LAYERS, checkpoint=ck,
                     checkpoint_every=1, progress=False)
    saved = torch.load(ck, weights_only=True)
    assert saved["done"] == 10  # two whole batches were checkpointed before the failure
    resumed = compdd.score(model, ds, layers=LAYERS, batch_size=5, resume=ck, progress=False)
    torch.testing.assert_close(resumed.complexity, full.complexity, rtol=0, atol=1e-12)
    assert torch.equal(resumed.counts, full.counts)
    assert torch.load(ck, weights_only=True)["done"] == len(ds)
    again = compdd.score(model, ds, layers=LAYERS, resume=ck, progress=False)  # finished: nothing left to do
    assert torch.equal(again.counts, full.counts)


def test_resume_from_another_configuration(tmp_path):
    model, ds = small_model(), make_data(n=6)
    ck = tmp_path / "ck.pt"
    compdd.score(model, ds, layers=LAYERS, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match="another configuration or dataset; threshold: checkpoint 0.5, this call 0.4"):
        compdd.score(model, ds, layers=LAYERS, threshold=0.4, resume=ck, progress=False)
    with pytest.raises(ValueError, match="layers"):
        compdd.score(model, ds, layers=LAYERS[:2], resume=ck, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        compdd.score(model, ds, layers=LAYERS, num_samples=2, resume=ck, progress=False)
    with pytest.raises(ValueError, match="dataset_size"):
        compdd.score(model, make_data(n=7), layers=LAYERS, resume=ck, progress=False)
    other = small_model(seed=1)
    with pytest.raises(ValueError, match="model: checkpoint"):
        compdd.score(other, ds, layers=LAYERS, resume=ck, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        compdd.score(model, ds, layers=LAYERS, resume=tmp_path / "missing.pt", progress=False)


def test_save_maps(tmp_path, scored):
    model, ds, res = scored
    path = tmp_path / "maps.npy"
    again = compdd.score(model, ds, layers=LAYERS, batch_size=4, save_maps=path, progress=False)
    assert torch.equal(again.counts, res.counts)
    maps = compdd.load_maps(path)
    assert list(maps) == LAYERS
    assert [maps[n].shape for n in LAYERS] == [(19, 12, 12), (19, 6, 6), (19, 3, 3)]
    assert not list(tmp_path.glob("*.npy"))[1:]  # one array file, not one per image
    x = ds.images[5:8]
    pred = model.eval()(x).argmax(1)
    z = compdd.image_noise(torch.arange(5, 8), x.shape[1:], 4, seed=0, dtype=x.dtype)
    with CAMExtractor(model, LAYERS) as ex:
        expected = ex(x, pred, noise=z)
    for name, m in zip(LAYERS, expected):
        np.testing.assert_allclose(maps[name][5:8], m.float().numpy(), rtol=0, atol=1e-6)


def test_custom_noise_callable():
    model, ds = small_model(), make_data(n=8)
    seen = []

    def zeros(indices, images):
        seen.append(indices.tolist())
        return torch.zeros((4,) + tuple(images.shape), dtype=images.dtype)

    res = compdd.score(model, ds, layers=LAYERS, noise=zeros, batch_size=3, progress=False)
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7]]
    ref = compdd.score(model, ds, layers=LAYERS, std=0.0, progress=False)  # std 0 = no noise either way
    torch.testing.assert_close(res.complexity, ref.complexity, rtol=0, atol=1e-12)


def test_score_bad_input():
    model, ds = small_model(), make_data(n=6)
    with pytest.raises(ValueError, match="'layer9' is not a module of the model"):
        compdd.score(model, ds, layers=["layer1", "layer9"])
    with pytest.raises(ValueError, match="not a module of the model"):
        compdd.score(model, ds, layers=[nn.Conv2d(3, 3, 1)])
    with pytest.raises(ValueError, match="non-empty"):
        compdd.score(model, ds, layers=[])
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="threshold must be a number in"):
            compdd.score(model, ds, layers=LAYERS, threshold=bad)
    with pytest.raises(ValueError, match="method"):
        compdd.score(model, ds, layers=LAYERS, method="scorecam")
    bad = TensorImages(ds.images, torch.tensor([0, 1, 2, 3, 2, 1]))
    bad.classes = ["a", "b", "c", "d"]  # 4 classes, but one label is 7
    bad.targets = torch.tensor([0, 1, 2, 3, 7, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        compdd.score(model, bad, layers=LAYERS, progress=False)
    with pytest.raises(ValueError, match="empty"):
        compdd.score(model, TensorImages(ds.images[:0], ds.targets[:0]), layers=LAYERS)
    with pytest.raises(TypeError, match="map-style"):
        compdd.score(model, iter([]), layers=LAYERS)


def test_model_left_as_found():
    model, ds = small_model(), make_data(n=5)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compdd.score(model, ds, layers=LAYERS, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


# ----------------------------------------------------------------------------- the result


def _result(k=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    comp = torch.rand(k, 2, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 50, (k,), generator=g)
    comp[3] = math.nan
    counts[3] = 0
    return compdd.ComplexityResult(layers=["a", "b"], complexity=comp, counts=counts, config={"threshold": 0.5},
                                   class_names=[f"n{i:03d}" for i in range(k)])


def test_rank():
    res = _result()
    cat = [c for c in range(30) if c != 3][:25]
    split = res.rank(cat)
    mean = res.complexity.mean(1)
    by = sorted(cat, key=lambda c: -float(mean[c]))
    assert split["hard"] == by[:10] and split["easy"] == by[::-1][:10]
    by_b = sorted(cat, key=lambda c: -float(res.complexity[c, 1]))
    assert res.rank(cat, layer="b")["hard"] == by_b[:10]
    assert res.rank(cat, k=3)["easy"] == by[::-1][:3]
    with pytest.raises(ValueError, match="no scored images"):
        res.rank(list(range(25)))
    with pytest.raises(ValueError, match="at least 2\\*k = 20"):
        res.rank(cat[:15])
    with pytest.raises(ValueError, match="more than once"):
        res.rank(cat + [cat[0]])
    with pytest.raises(ValueError, match=r"in \[0, 30\)"):
        res.rank(cat[:24] + [30])
    with pytest.raises(ValueError, match="layer must be one of"):
        res.rank(cat, layer="c")


def test_json_csv_roundtrip(tmp_path):
    res = _result()
    text = res.to_json(tmp_path / "r.json")
    d = json.loads(text)  # strict JSON: NaN written as null
    assert d["classes"][3]["mean"] is None and d["classes"][0]["name"] == "n000"
    back = compdd.ComplexityResult.from_json(tmp_path / "r.json")
    assert back.layers == res.layers and torch.equal(back.counts, res.counts)
    torch.testing.assert_close(back.complexity, res.complexity, rtol=0, atol=0, equal_nan=True)
    assert back.class_names == res.class_names and back.config == res.config
    csv_text = res.to_csv(tmp_path / "r.csv")
    lines = csv_text.splitlines()
    assert lines[0] == "label,name,count,a,b,mean" and len(lines) == 31
    row = lines[1].split(",")
    assert int(row[2]) == int(res.counts[0]) and float(row[3]) == float(res.complexity[0, 0])


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    res = _result()
    res.plot(tmp_path / "all.png")
    res.plot(tmp_path / "cat.png", [c for c in range(30) if c != 3])
    assert (tmp_path / "all.png").stat().st_size > 1000 and (tmp_path / "cat.png").stat().st_size > 1000


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        _result().plot(tmp_path / "x.png")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    (tmp_path / "compdd_test_models.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(11, 3, 8, 8, generator=g), torch.tensor([0, 1, 2] * 3 + [0, 1])
    torch.save({"images": images, "labels": labels}, tmp_path / "data.pt")
    np.savez(tmp_path / "data.npz", images=images.numpy(), labels=labels.numpy())
    return tmp_path, images, labels


def test_cli_score_pt_npz_and_resume(cli_setup, capsys):
    tmp, images, labels = cli_setup
    args = ["score", "--model", "compdd_test_models:build", "--layers", "layer1,layer2", "--batch-size", "4"]
    assert main(args + ["--data", str(tmp / "data.pt"), "--out", str(tmp / "o1")]) == 0
    assert "scored 11 images over 3 classes" in capsys.readouterr().out
    r1 = compdd.ComplexityResult.from_json(tmp / "o1" / "complexity.json")
    assert (tmp / "o1" / "complexity.csv").exists() and (tmp / "o1" / "checkpoint.pt").exists()
    import compdd_test_models

    expected = compdd.score(compdd_test_models.build(), TensorImages(images, labels), layers=["layer1", "layer2"],
                            progress=False)
    torch.testing.assert_close(r1.complexity, expected.complexity, rtol=0, atol=1e-12)
    assert main(args + ["--data", str(tmp / "data.npz"), "--out", str(tmp / "o2"), "--resume"]) == 0
    assert "starting from the beginning" in capsys.readouterr().err
    r2 = compdd.ComplexityResult.from_json(tmp / "o2" / "complexity.json")
    torch.testing.assert_close(r2.complexity, r1.complexity, rtol=0, atol=0)
    assert main(args + ["--data", str(tmp / "data.pt"), "--out", str(tmp / "o1"), "--resume"]) == 0  # finished run
    # a resume with another threshold is refused with the reason
    assert main(args + ["--data", str(tmp / "data.pt"), "--out", str(tmp / "o1"), "--resume",
                        "--threshold", "0.3"]) == 2
    assert "another configuration or dataset; threshold" in capsys.readouterr().err


def test_cli_errors(cli_setup, capsys, monkeypatch):
    tmp, _, _ = cli_setup
    base = ["score", "--model", "compdd_test_models:build", "--out", str(tmp / "o")]
    assert main(base + ["--data", str(tmp / "data.pt"), "--layers", "layer1,nope"]) == 2
    assert "'nope' is not a module of the model" in capsys.readouterr().err
    assert main(base[:2] + ["compdd_test_models:missing"] + base[3:] + ["--data", str(tmp / "data.pt"),
                                                                         "--layers", "layer1"]) == 2
    assert "has no attribute 'missing'" in capsys.readouterr().err
    (tmp / "folder" / "cls0").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if torchvision were not installed
    assert main(base + ["--data", str(tmp / "folder"), "--layers", "layer1"]) == 2
    err = capsys.readouterr().err
    assert "needs torchvision" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--data", str(tmp / "nothing.pt"), "--layers", "layer1"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_subsets(capsys):
    assert main(["subsets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 16 and out[14].split()[0] == "music_hard"


def test_python_dash_m(cli_setup):
    import subprocess

    tmp, _, _ = cli_setup
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), os.getcwd()]))
    p = subprocess.run([sys.executable, "-m", "edfkern.compdd", "score", "--data", str(tmp / "data.pt"), "--model",
                        "compdd_test_models:build", "--layers", "layer1,layer2", "--out", str(tmp / "o3")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp / "o3" / "complexity.json").read_text())["layers"] == ["layer1", "layer2"]


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from edfkern.compdd import _score

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert _score._progress_bar(True, total=10, initial=0) is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert _score._progress_bar(False, total=10, initial=0) is None
    pytest.importorskip("tqdm")
    bar = _score._progress_bar(True, total=10, initial=4)
    try:
        assert bar.total == 10 and bar.n == 4 and bar.unit == "img"  # tqdm shows img/s
    finally:
        bar.close()


def test_score_a_subset_keeps_its_imagenet_classes():
    cls = compdd.classes("fish_easy")
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor(cls * 2 + [7, 999, 500])  # 3 images of other classes are filtered out
    images = torch.randn(len(labels), 3, 12, 12, generator=g, dtype=torch.float64)
    sub = compdd.subset(TensorImages(images, labels), "fish_easy")
    res = compdd.score(small_model(), sub, layers=LAYERS, batch_size=6, progress=False)
    assert res.class_names == cls and res.counts.tolist() == [2] * 10
    assert json.loads(res.to_json())["classes"][0]["name"] == cls[0]
