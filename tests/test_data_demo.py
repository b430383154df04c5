"""The demo generator: deterministic, read by the brats2d loader, and not trivially easy."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data import DataConfigError, Preprocess, create_dataset, detect_layout
from data.demo import generate_slice, run, write_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_all(root):
    return {str(p.relative_to(root)): np.asarray(nib.load(str(p)).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    write_demo_dataset(str(out), n_train=64, n_test=8, image_size=64, seed=0)
    return out


def test_demo_is_laid_out_as_brats2d(demo):
    out = demo
    assert detect_layout(str(out)) == "brats2d"
    first = sorted((out / "training" / "000001").iterdir())
    assert [p.name for p in first] == [f"demo_001_{m}_000_w.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")]
    train = create_dataset(out / "training", preprocess=Preprocess(image_size=64))
    test = create_dataset(out / "testing", preprocess=Preprocess(image_size=64))
    assert len(train) == 64 and len(test) == 8 and train.labelled and test.labelled
    assert not {r.patient_id for r in train.records} & {r.patient_id for r in test.records}
    item = train[0]
    assert item["image"].shape == (4, 64, 64) and item["meta"]["patient_id"] == "001"


def test_demo_is_deterministic(demo, tmp_path):
    out = demo
    again = tmp_path / "again"
    write_demo_dataset(str(again), n_train=8, n_test=0, image_size=64, seed=0)
    second = read_all(again)
    first = {k: v for k, v in read_all(out).items() if k in second}
    assert len(first) == len(second) == 8 * 5  # the first slices do not depend on the counts
    assert all(np.array_equal(first[k], second[k]) for k in first)
    image, seg = generate_slice(1, 3, 2, 32)
    other, _ = generate_slice(2, 3, 2, 32)
    assert image.dtype == np.float32 and seg.dtype == np.uint8 and not np.array_equal(image, other)


def test_demo_content_is_varied_and_not_trivial(demo):
    out = demo
    train = create_dataset(out / "training", preprocess=Preprocess(image_size=64))
    images = np.stack([train[i]["image"].numpy() for i in range(len(train))])
    segs = np.stack([np.asarray(nib.load(r.label_file).dataobj) for r in train.records])
    assert set(np.unique(segs).tolist()) == {0, 1, 2, 4}
    empty = (segs.reshape(len(segs), -1) == 0).all(axis=1).mean()
    assert 0.05 <= empty <= 0.45  # about a fifth of the slices have no tumour
    sizes = (segs > 0).reshape(len(segs), -1).sum(axis=1)
    assert sizes[sizes > 0].max() > 3 * sizes[sizes > 0].min()
    brain = images[:, 0] > 0
    per_channel = [images[:, c][brain].mean() for c in range(4)]
    assert np.ptp(per_channel) > 0.05  # the sequences differ in contrast
    fg = segs > 0
    best = 0.0
    for c in range(4):  # no single-channel threshold segments it well
        for t in np.linspace(0.05, 0.95, 37):
            for pred in (images[:, c] > t, images[:, c] < t):
                pred = pred & brain
                best = max(best, 2 * (pred & fg).sum() / (pred.sum() + fg.sum()))
    assert best < 0.8


def test_demo_split_by_patient(demo):
    out = demo
    kw = dict(preprocess=Preprocess(image_size=64), val_fraction=0.25)
    train = create_dataset(out / "training", subset="train", **kw)
    val = create_dataset(out / "training", subset="val", **kw)
    assert len(train) + len(val) == 64 and len(val) == 16
    assert not {r.patient_id for r in train.records} & {r.patient_id for r in val.records}


def test_demo_cli_and_existing_output(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n_train", "4", "--n_test", "2", "--image_size", "16", "--seed", "0"]
    done = subprocess.run([sys.executable, "-m", "data.demo"] + args, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(list((out / "training").iterdir())) == 4 and len(list((out / "testing").iterdir())) == 2
    # The same demo again is a no-op; a different one into the same folder is refused.
    assert run(args) == 0
    capsys.readouterr()
    assert run(args[:-1] + ["1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(out) in err
    with pytest.raises(DataConfigError, match="at least 16"):
        write_demo_dataset(str(tmp_path / "tiny"), image_size=8)
