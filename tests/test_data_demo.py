"""The demo generator: deterministic, read by the brats2d loader, and not trivially easy."""

import hashlib
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data import DataConfigError, Preprocess, create_dataset, detect_layout
from data.demo import NESTED_REGIONS, generate_slice, run, write_demo_dataset
from data.preprocess import parse_regions

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


def test_default_slices_are_those_of_the_code_before_nested_classes():
    # SHA-256 of these slices' arrays as the generator wrote them before --classes existed (bf4277a).
    h = hashlib.sha256()
    for patient, z in ((1, 0), (1, 2), (2, 1), (7, 3)):
        image, seg = generate_slice(0, patient, z, 32)
        h.update(image.tobytes())
        h.update(seg.tobytes())
    assert h.hexdigest() == "506391ee02b862e8149324e24677e503ad01aa607ff4c0a487bf63e508fded10"


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    out = tmp_path_factory.mktemp("nested") / "demo"
    write_demo_dataset(str(out), n_train=32, n_test=6, image_size=48, seed=0, classes=3)
    return out


def test_nested_demo_is_brats2023_volumes_one_per_patient(nested):
    assert detect_layout(str(nested / "training")) == "brats3d"
    cases = sorted(p.name for p in (nested / "training").iterdir())
    assert cases == [f"DEMO-{pid:05d}-000" for pid in range(1, 9)]
    assert sorted(p.name for p in (nested / "training" / cases[0]).iterdir()) == [
        f"{cases[0]}-{m}.nii.gz" for m in ("seg", "t1c", "t1n", "t2f", "t2w")]
    # The test patients follow the training ones; the last volume holds the slices left over.
    assert sorted(p.name for p in (nested / "testing").iterdir()) == ["DEMO-00009-000", "DEMO-00010-000"]
    assert nib.load(str(nested / "testing" / "DEMO-00010-000" / "DEMO-00010-000-seg.nii.gz")).shape == (48, 48, 2)
    # Its slices are the nested versions of the 2D demo's: the same brains, other tumour labels.
    volume = np.asarray(nib.load(str(nested / "training" / cases[1] / f"{cases[1]}-t2f.nii.gz")).dataobj)
    image, seg = generate_slice(0, 2, 3, 48, nested=True)
    np.testing.assert_array_equal(volume[..., 3], image[3])
    plain, plain_seg = generate_slice(0, 2, 3, 48)
    np.testing.assert_array_equal(seg > 0, plain_seg > 0)


def test_nested_regions_are_nested_and_visible(nested):
    records = create_dataset(nested / "training", preprocess=Preprocess(image_size=48)).records
    volumes = [(np.stack([np.asarray(nib.load(f).dataobj) for f in r.image_files]),
                np.asarray(nib.load(r.label_file).dataobj)) for r in records]
    images = np.concatenate([v[0] for v in volumes], axis=-1)  # [4, H, W, slices]
    segs = np.concatenate([v[1] for v in volumes], axis=-1)
    assert set(np.unique(segs).tolist()) == {0, 1, 2, 3}
    tumour = segs.reshape(-1, segs.shape[-1]).any(axis=0)
    per_slice = [set(np.unique(segs[..., k]).tolist()) for k in range(segs.shape[-1]) if tumour[k]]
    assert sum(s == {0, 1, 2, 3} for s in per_slice) >= len(per_slice) // 2
    # Nested: around the enhancing part (3) lies the core (1), around the core (1 or 3) the oedema (2)
    # (mostly: a thin oedema rim can leave the core at the edge of the brain).
    for inner, around in (((3,), 1), ((1, 3), 2)):
        neighbours = []
        for k in range(segs.shape[-1]):
            region = np.isin(segs[..., k], inner)
            neighbours.append(segs[..., k][ndimage.binary_dilation(region) & ~region])
        neighbours = np.concatenate(neighbours)
        assert (neighbours == around).mean() > 0.8, (inner, np.unique(neighbours, return_counts=True))
    # Each sub-region has its own look (channels t1, t1ce, t2, flair): enhancing bright on T1ce, the
    # core darker than oedema on T1 and FLAIR, oedema brighter than the brain around it on FLAIR.
    mean = {v: images[:, segs == v].mean(axis=1) for v in (1, 2, 3)}
    brain = images[:, (segs == 0) & (images[0] > 0)].mean(axis=1)
    assert mean[3][1] > mean[1][1] + 0.2 and mean[3][1] > mean[2][1] + 0.15
    assert mean[2][0] > mean[1][0] + 0.05 and mean[2][3] > mean[1][3] + 0.05
    assert mean[2][3] > brain[3] + 0.15


@pytest.mark.parametrize("label_mode", ["regions", "multiclass"])
def test_nested_demo_loads_with_its_regions_and_classes(nested, label_mode):
    kw = {"regions": parse_regions(NESTED_REGIONS)} if label_mode == "regions" else {"classes": (1, 2, 3)}
    pre = Preprocess(image_size=48, label_mode=label_mode, **kw)
    train = create_dataset(nested / "training", preprocess=pre)
    assert len(train) == 32 and train.preprocess.num_mask_channels == 3
    labels = np.stack([train[i]["label"].numpy() for i in range(len(train))])
    assert labels.shape == (32, 3, 48, 48)
    voxels = labels.sum(axis=(0, 2, 3))
    assert (voxels > 0).all()
    if label_mode == "regions":  # WT contains TC contains ET
        assert (labels[:, 1] <= labels[:, 0]).all() and (labels[:, 2] <= labels[:, 1]).all()
    else:
        assert (labels.sum(axis=1) <= 1).all()


def test_nested_demo_cli_names_its_regions(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "data.demo", "--out", str(out), "--n_train", "4", "--n_test", "0",
                           "--image_size", "16", "--classes", "3"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'--regions "{NESTED_REGIONS}"' in done.stdout and NESTED_REGIONS == "WT:1,2,3;TC:1,3;ET:3"
    with pytest.raises(DataConfigError, match="--classes 2: the demo has 3 nested classes"):
        write_demo_dataset(str(tmp_path / "two"), n_train=4, classes=2)
