"""Every layout read from real files on disk: shapes, dtypes, labels, meta, splits, geometry."""

import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data import (DATA_HELP, DataConfigError, Preprocess, collate, create_dataset, create_loader,
                  data_defaults, dataset_from_args, detect_layout, preprocess_from_args, restore_geometry)
from data.loader import GroupedSampler
from data.preprocess import apply_geometry, geometry_plan

LGG_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lgg_flair"
META_KEYS = {"source_files", "format", "layout", "original_shape", "spacing", "affine", "reference_file",
             "patient_id", "volume_id", "slice_index", "volume_shape", "slice_axis", "geometry"}
SMALL = Preprocess(image_size=16)


def write_nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(str(path))


def brain_slice(rng, h=12, w=14):
    img = np.zeros((h, w), np.float32)
    img[2:-2, 2:-2] = rng.uniform(10, 100, (h - 4, w - 4))
    return img


def make_brats2d(root, patients=(1, 2, 3), slices=(10, 11), with_seg=True, h=12, w=14):
    rng = np.random.default_rng(0)
    n = 0
    for p in patients:
        for s in slices:
            n += 1
            folder = root / f"{n:06d}"
            for mod in ("t1", "t1ce", "t2", "flair"):
                write_nifti(folder / f"brats_train_{p:03d}_{mod}_{s:03d}_w.nii.gz", brain_slice(rng, h, w))
            if with_seg:
                seg = np.zeros((h, w), np.float64)
                seg[4:7, 4:8], seg[5, 5], seg[6, 6] = 2, 1, 4
                write_nifti(folder / f"brats_train_{p:03d}_seg_{s:03d}_w.nii.gz", seg)
    return root


def make_brats3d(root, cases=("BraTS2021_00001", "BraTS2021_00002"), naming="2021", shape=(12, 14, 6)):
    rng = np.random.default_rng(1)
    if naming == "2021":
        mods, sep, top = ("t1", "t1ce", "t2", "flair"), "_", 4
    else:
        mods, sep, top = ("t1n", "t1c", "t2w", "t2f"), "-", 3
    affine = np.diag([1.0, 1.5, 2.5, 1.0])
    for case in cases:
        vol = np.zeros(shape, np.int16)
        vol[2:-2, 2:-2, 1:4] = rng.integers(1, 400, (shape[0] - 4, shape[1] - 4, 3))
        seg = np.zeros(shape, np.uint8)
        seg[4:8, 5:9, 2], seg[5, 6, 2], seg[4:6, 4:6, 3] = 2, top, 1
        for mod in mods:
            write_nifti(root / case / f"{case}{sep}{mod}.nii.gz", vol, affine)
        write_nifti(root / case / f"{case}{sep}seg.nii.gz", seg, affine)
    return root


def make_lgg_copy(tmp_path, n=3):
    if not LGG_DIR.is_dir():
        pytest.skip(f"real data folder {LGG_DIR} is missing (../shared beside the repo)")
    dst = tmp_path / "lgg"
    for folder in sorted(LGG_DIR.iterdir())[:n]:
        if folder.is_dir():
            shutil.copytree(folder, dst / folder.name)
    return dst


def check_item(item, channels, size=16, labelled=True):
    assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (channels, size, size)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    if labelled:
        assert item["label"].dtype == torch.int64 and tuple(item["label"].shape) == (size, size)
        assert set(item["label"].unique().tolist()) <= {0, 1}
    else:
        assert "label" not in item
    assert isinstance(item["case_id"], str) and item["case_id"]
    assert set(item["meta"]) == META_KEYS
    pickle.loads(pickle.dumps(item["meta"]))
    json.dumps(item["meta"])  # plain python values only


def test_brats2d_real_fixture(brats2d_mini):
    ds = create_dataset(brats2d_mini, preprocess=Preprocess(image_size=256))
    assert ds.layout == "brats2d" and ds.channel_names == ("t1", "t1ce", "t2", "flair") and len(ds) == 8
    labelled = [it for it in (ds[i] for i in range(len(ds))) if "label" in it]
    assert len(labelled) == 6  # testing/ slices have no seg
    item = labelled[0]
    check_item(item, 4, 256)
    meta = item["meta"]
    assert meta["patient_id"] == "001" and meta["slice_index"] == 80 and meta["original_shape"] == [240, 240]
    assert meta["format"] == "nifti_slice" and len(meta["affine"]) == 4
    assert meta["reference_file"].endswith("_t1_080_w.nii.gz")
    assert meta["geometry"]["dst_start"] == [8, 8]  # 240 -> 256 pads 8 each side
    seg = np.asarray(nib.load(meta["source_files"][-1]).dataobj)
    np.testing.assert_array_equal(restore_geometry(item["label"].numpy(), meta), (seg != 0).astype(np.int64))
    test_only = create_dataset(brats2d_mini / "testing", preprocess=SMALL)
    assert not test_only.labelled and "label" not in test_only[0]


def test_brats2d_tmp_and_label_subset(tmp_path):
    root = make_brats2d(tmp_path / "b2")
    ds = create_dataset(root, dataset="brats2d", preprocess=SMALL)
    check_item(ds[0], 4)
    assert ds[0]["label"].sum() == 12  # 3x4 whole tumour
    core = create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="subset", foreground_labels=(1, 4)))
    assert core[0]["label"].sum() == 2
    with pytest.raises(DataConfigError, match="foreground_labels 3"):
        create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="subset", foreground_labels=(3,)))


@pytest.mark.parametrize("naming", ["2021", "2023"])
def test_brats3d_slices_and_reassembly(tmp_path, naming):
    if naming == "2021":
        cases = ("BraTS2021_00001", "BraTS2021_00002")
    else:
        cases = ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000")
    root = make_brats3d(tmp_path / "b3", cases, naming)
    ds = create_dataset(root, preprocess=SMALL)
    assert ds.layout == "brats3d" and len(ds) == 12 and ds.num_channels == 4
    train = create_dataset(root, preprocess=SMALL, subset="train", val_fraction=0.5)
    assert len(train) == 3  # one case, brain slices 1..3 only
    assert [it["meta"]["slice_index"] for it in (train[i] for i in range(3))] == [1, 2, 3]
    item = ds[2]
    check_item(item, 4)
    meta = item["meta"]
    assert meta["format"] == "nifti_volume_slice" and meta["volume_shape"] == [12, 14, 6] and meta["slice_axis"] == 2
    assert meta["spacing"] == [1.0, 1.5] and meta["affine"][2][2] == 2.5
    # Predicted slices stack back into the volume at its own size.
    volume_id = meta["volume_id"]
    pred = np.zeros(meta["volume_shape"], np.int64)
    for i in range(len(ds)):
        it = ds[i]
        if it["meta"]["volume_id"] == volume_id:
            pred[:, :, it["meta"]["slice_index"]] = restore_geometry(it["label"].numpy(), it["meta"])
    seg = np.asarray(nib.load(meta["source_files"][-1]).dataobj)
    np.testing.assert_array_equal(pred, seg != 0)


def test_volume_cache_reads_each_case_once(tmp_path):
    root = make_brats3d(tmp_path / "b3")
    ds = create_dataset(root, preprocess=SMALL, cache_volumes=1)
    for i in range(len(ds)):
        ds[i]
    assert list(ds._cache) == [1]  # the last case only; slices of a case share one decode
    assert not pickle.loads(pickle.dumps(ds))._cache


def make_nnunet(root, two_d):
    channels = {"0": "R", "1": "G", "2": "B"} if two_d else {"0": "T2", "1": "ADC"}
    ending = ".png" if two_d else ".nii.gz"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(2)
    for case in ("case_a", "case_b", "case_c"):
        if two_d:
            write_png(root / "imagesTr" / f"{case}_0000.png", rng.integers(1, 255, (10, 12, 3)))
            label = np.zeros((10, 12), np.uint8)
            label[3:6, 3:7] = 1
            write_png(root / "labelsTr" / f"{case}.png", label)
        else:
            for c in range(2):
                volume = rng.uniform(1, 5, (10, 12, 3)).astype(np.float32)
                write_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", volume)
            label = np.zeros((10, 12, 3), np.uint8)
            label[3:6, 3:7, 1] = 2
            write_nifti(root / "labelsTr" / f"{case}.nii.gz", label)
    (root / "imagesTs").mkdir()
    shutil.copy(root / "imagesTr" / f"case_a_0000{ending}", root / "imagesTs" / f"case_z_0000{ending}")
    if not two_d:
        shutil.copy(root / "imagesTr" / "case_a_0001.nii.gz", root / "imagesTs" / "case_z_0001.nii.gz")
    spec = {"channel_names": channels, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 3,
            "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_nnunet_2d_png(tmp_path):
    root = make_nnunet(tmp_path / "Dataset001_X", two_d=True)
    ds = create_dataset(root, preprocess=SMALL)
    assert ds.layout == "nnunet" and len(ds) == 3 and ds.channel_names == ("R", "G", "B")
    check_item(ds[0], 3)
    assert ds[0]["label"].sum() == 12 and ds[0]["meta"]["format"] == "image"
    test = create_dataset(root / "imagesTs", preprocess=SMALL)
    assert len(test) == 1 and "label" not in test[0] and test[0]["case_id"] == "case_z"


def test_nnunet_3d_nifti(tmp_path):
    root = make_nnunet(tmp_path / "Dataset002_Y", two_d=False)
    ds = create_dataset(root, preprocess=SMALL)
    assert ds.channel_names == ("T2", "ADC") and len(ds) == 9 and ds.declared_labels == (0, 1, 2)
    item = ds[1]
    check_item(item, 2)
    assert item["label"].sum() == 12 and item["case_id"] == "case_a_001"
    assert item["meta"]["format"] == "nifti_volume_slice" and item["meta"]["volume_id"] == "case_a"


def test_folder_layout_png_and_jpg(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "kvasir"
    for i, ext in enumerate(("png", "jpg", "bmp", "tif")):
        write_png(root / "images" / f"img{i}.{ext}", rng.integers(0, 255, (20, 18, 3)))
        mask = np.zeros((20, 18), np.uint8)
        mask[5:15, 4:12] = 255
        write_png(root / "masks" / f"img{i}.{'jpg' if ext == 'jpg' else 'png'}", mask)
    ds = create_dataset(root, preprocess=SMALL)
    assert ds.layout == "folder" and len(ds) == 4 and ds.channel_names == ("R", "G", "B")
    for i in range(4):
        item = ds[i]
        check_item(item, 3)
        full = restore_geometry(item["label"].numpy(), item["meta"])
        assert full.shape == (20, 18) and full[5:15, 4:12].all() and full.sum() == 80


def test_isic_layout(tmp_path):
    rng = np.random.default_rng(4)
    data_dir = tmp_path / "isic" / "ISBI2016_ISIC_Part1_Training_Data"
    truth = tmp_path / "isic" / "ISBI2016_ISIC_Part1_Training_GroundTruth"
    for name in ("ISIC_0000000", "ISIC_0000001"):
        write_png(data_dir / f"{name}.jpg", rng.integers(0, 255, (14, 16, 3)))
        mask = np.zeros((14, 16), np.uint8)
        mask[2:8, 3:9] = 255
        write_png(truth / f"{name}_Segmentation.png", mask)
    ds = create_dataset(tmp_path / "isic", preprocess=SMALL)
    assert ds.layout == "isic" and len(ds) == 2 and ds.case_ids == ["ISIC_0000000", "ISIC_0000001"]
    check_item(ds[1], 3)
    assert ds[1]["label"].sum() == 36


def test_lgg_real_patients(tmp_path):
    root = make_lgg_copy(tmp_path, n=3)
    ds = create_dataset(root, preprocess=Preprocess(image_size=256))
    assert ds.layout == "lgg" and ds.labelled and ds.channel_names == ("pre-contrast", "FLAIR", "post-contrast")
    patients = {r.patient_id for r in ds.records}
    assert len(patients) == 3
    item = max((ds[i] for i in range(0, len(ds), 3)), key=lambda it: int(it["label"].sum()))
    check_item(item, 3, 256)
    mask = np.asarray(Image.open(item["meta"]["source_files"][-1]))
    np.testing.assert_array_equal(item["label"].numpy(), (mask == 255).astype(np.int64))
    assert item["meta"]["volume_id"] == item["meta"]["patient_id"] and isinstance(item["meta"]["slice_index"], int)


def test_lgg_real_folder_in_place():
    if not LGG_DIR.is_dir():
        pytest.skip(f"real data folder {LGG_DIR} is missing")
    train = create_dataset(LGG_DIR, preprocess=SMALL, subset="train", val_fraction=0.2)
    val = create_dataset(LGG_DIR, preprocess=SMALL, subset="val", val_fraction=0.2)
    assert len(train) + len(val) == 1045
    assert len({r.patient_id for r in val.records}) == 10
    assert not {r.patient_id for r in train.records} & {r.patient_id for r in val.records}


def test_auto_detection(tmp_path, brats2d_mini):
    assert detect_layout(str(brats2d_mini)) == "brats2d"
    assert detect_layout(str(make_brats3d(tmp_path / "b3"))) == "brats3d"
    assert detect_layout(str(make_nnunet(tmp_path / "nn", two_d=True))) == "nnunet"
    assert detect_layout(str(tmp_path / "nn" / "imagesTs")) == "nnunet"
    write_png(tmp_path / "f" / "images" / "a.png", np.ones((4, 4)))
    assert detect_layout(str(tmp_path / "f")) == "folder"
    write_png(tmp_path / "i" / "ISBI2016_ISIC_Part1_Test_Data" / "ISIC_1.jpg", np.ones((4, 4)))
    assert detect_layout(str(tmp_path / "i")) == "isic"
    write_png(tmp_path / "l" / "P1" / "P1_1.tif", np.ones((4, 4)))
    write_png(tmp_path / "l" / "P1" / "P1_1_mask.tif", np.zeros((4, 4)))
    assert detect_layout(str(tmp_path / "l")) == "lgg"


def test_patient_split_is_disjoint_and_fixed(tmp_path):
    root = make_brats2d(tmp_path / "b2", patients=range(1, 11), slices=(1, 2, 3))
    kw = dict(preprocess=SMALL, val_fraction=0.3, split_seed=5)
    train, val = create_dataset(root, subset="train", **kw), create_dataset(root, subset="val", **kw)
    train_p, val_p = {r.patient_id for r in train.records}, {r.patient_id for r in val.records}
    assert len(val_p) == 3 and not train_p & val_p and len(train) + len(val) == 30
    assert val.case_ids == create_dataset(root, subset="val", **kw).case_ids
    other = create_dataset(root, subset="val", preprocess=SMALL, val_fraction=0.3, split_seed=6)
    assert {r.patient_id for r in other.records} != val_p
    by_case = create_dataset(root, subset="val", preprocess=SMALL, val_fraction=0.3, split_by="case")
    assert len(by_case) == 9


def test_crop_pad_round_trip_exact_with_augmentation():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 5, (2, 20, 11))
    for seed in range(5):
        plan = geometry_plan((20, 11), 16, "crop_pad", rng=np.random.default_rng(seed))
        out = apply_geometry(array, plan, order=0)
        assert out.shape == (2, 16, 16)
        back = restore_geometry(out, {"geometry": plan})
        (sy, _), (ny, _) = plan["src_start"], plan["extent"]
        np.testing.assert_array_equal(back[:, sy:sy + ny], array[:, sy:sy + ny])
        assert not back[:, :sy].any() and not back[:, sy + ny:].any()
    small = array[:, :12, :11]
    plan = geometry_plan((12, 11), 16, "crop_pad")
    assert plan["dst_start"] == [2, 2] and plan["extent"] == [12, 11]
    np.testing.assert_array_equal(restore_geometry(apply_geometry(small, plan, 0), {"geometry": plan}), small)


def test_resize_round_trip(tmp_path):
    root = make_brats2d(tmp_path / "b2", patients=(1,), slices=(1,), h=8, w=8)
    ds = create_dataset(root, preprocess=Preprocess(image_size=16, resize_mode="resize"))
    item = ds[0]
    assert item["meta"]["geometry"]["mode"] == "resize"
    seg = np.asarray(nib.load(item["meta"]["source_files"][-1]).dataobj)
    np.testing.assert_array_equal(restore_geometry(item["label"], item["meta"], order=0), (seg != 0).astype(np.int64))
    smooth = np.outer(np.linspace(0, 1, 8), np.linspace(1, 2, 8)).astype(np.float32)
    plan = geometry_plan((8, 8), 16, "resize")
    back = restore_geometry(apply_geometry(smooth, plan, order=1), {"geometry": plan}, order=1)
    assert back.shape == (8, 8) and np.abs(back - smooth)[1:-1, 1:-1].max() < 0.01


def test_augmentation_changes_training_items_only(tmp_path):
    root = make_brats2d(tmp_path / "b2", patients=(1, 2), slices=(1,), h=12, w=12)
    plain = create_dataset(root, preprocess=SMALL)
    aug = create_dataset(root, preprocess=SMALL, augment=True)
    torch.manual_seed(3)
    items = [aug[0] for _ in range(6)]
    assert any(not torch.equal(it["image"], plain[0]["image"]) for it in items)
    for it in items:  # the label follows the image's geometry exactly
        expected = restore_geometry(plain[0]["label"], plain[0]["meta"])
        np.testing.assert_array_equal(restore_geometry(it["label"], it["meta"]), expected)


def test_dataloader_workers_and_collate(tmp_path):
    root = make_brats3d(tmp_path / "b3")
    ds = create_dataset(root, preprocess=SMALL, subset="all")
    loader = create_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=1)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (4, 16, 16) and batch["label"].dtype == torch.int64
        assert len(batch["case_id"]) == len(batch["meta"]) == batch["image"].shape[0]
        seen += batch["case_id"]
    assert sorted(seen) == sorted(ds.case_ids)
    mixed = collate([ds[0], {k: v for k, v in ds[1].items() if k != "label"}])
    assert "label" not in mixed and mixed["image"].shape == (2, 4, 16, 16)


def test_grouped_sampler_keeps_volumes_together_and_shards():
    class Fake:
        group_ids = [i // 10 for i in range(40)]

        def __len__(self):
            return 40

    order = list(GroupedSampler(Fake(), shuffle=True, seed=0, window=2))
    assert sorted(order) == list(range(40))
    assert len({i // 10 for i in order[:20]}) == 2  # the first window holds two volumes
    shards = [list(GroupedSampler(Fake(), seed=0, rank=r, world_size=3)) for r in range(3)]
    assert sum(len(s) for s in shards) == 42 and set().union(*shards) == set(range(40))


def test_preprocess_record_round_trip():
    pre = Preprocess(image_size=32, resize_mode="resize", label_mode="subset", foreground_labels=(4, 1),
                     channel_names=("t1", "t2"), dataset="brats2d")
    d = pre.to_dict()
    assert json.loads(json.dumps(d)) == d and isinstance(d["foreground_labels"], list)
    assert Preprocess.from_dict(d) == pre
    with pytest.raises(DataConfigError, match="unknown keys"):
        Preprocess.from_dict({**d, "bogus": 1})
    with pytest.raises(DataConfigError, match="resize_mode"):
        Preprocess(resize_mode="stretch")


def test_flags_and_builders(tmp_path, brats2d_mini):
    defaults = data_defaults()
    assert set(defaults) == set(DATA_HELP) and all(DATA_HELP.values())
    args = dict(defaults, data_dir=str(brats2d_mini / "training"), image_size=16, foreground_labels="1,4")
    pre = preprocess_from_args(args)
    assert pre.label_mode == "subset" and pre.foreground_labels == (1, 4)
    ds = dataset_from_args(args, "all")
    assert ds.preprocess.channel_names == ("t1", "t1ce", "t2", "flair") and ds.preprocess.dataset == "brats2d"
    recorded = Preprocess.from_dict(ds.preprocess.to_dict())
    again = dataset_from_args(dict(args, image_size=64), "all", preprocess=recorded)
    assert again[0]["image"].shape == (4, 16, 16)


def test_normalisation_keeps_background_zero(tmp_path):
    root = make_brats2d(tmp_path / "b2", patients=(1,), slices=(1,))
    item = create_dataset(root, preprocess=SMALL)[0]
    full = restore_geometry(item["image"].numpy(), item["meta"], order=1)
    raw = np.asarray(nib.load(item["meta"]["source_files"][0]).dataobj)
    assert (full[0][raw == 0] == 0).all() and full[0][raw != 0].max() == 1.0


def test_fast_nifti_reader_matches_nibabel(tmp_path, brats2d_mini):
    from data.io import read_nifti

    scaled = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.diag([0.5, 2.0, 3.0, 1.0]))
    scaled.header.set_slope_inter(2.0, 1.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((3, 3), np.uint8), np.eye(4)), str(tmp_path / "plain.nii"))
    paths = [tmp_path / "scaled.nii.gz", tmp_path / "plain.nii"]
    paths += sorted((brats2d_mini / "training" / "000001").iterdir())
    for path in paths:
        data, header = read_nifti(str(path))
        img = nib.load(str(path))
        np.testing.assert_allclose(data, np.asanyarray(img.dataobj), rtol=1e-6)
        np.testing.assert_allclose(header.affine, img.affine)
        assert header.shape == img.shape and header.zooms == tuple(float(z) for z in img.header.get_zooms())


def test_original_label_kept_at_input_size(tmp_path):
    root = make_brats2d(tmp_path / "b2", patients=(1,), slices=(1,), h=12, w=14)
    ds = create_dataset(root, preprocess=Preprocess(image_size=16, resize_mode="resize"), keep_original_label=True)
    item = ds[0]
    seg = np.asarray(nib.load(item["meta"]["source_files"][-1]).dataobj)
    np.testing.assert_array_equal(item["original_label"].numpy(), (seg != 0).astype(np.int64))
    batch = collate([item, item])
    assert len(batch["original_label"]) == 2 and batch["original_label"][0].shape == (12, 14)
    assert "original_label" not in create_dataset(root, preprocess=SMALL)[0]


def test_iterate_forever_reshuffles_epochs(tmp_path):
    from data import iterate_forever

    root = make_brats2d(tmp_path / "b2", patients=(1, 2, 3), slices=(1,))
    loader = create_loader(create_dataset(root, preprocess=SMALL), batch_size=1, shuffle=True, seed=0)
    batches = iterate_forever(loader)
    ids = [next(batches)["case_id"][0] for _ in range(9)]
    epochs = [ids[0:3], ids[3:6], ids[6:9]]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and len({tuple(e) for e in epochs}) > 1


def test_regions_must_be_nested_or_disjoint_and_paint_back_exactly():
    """Nested and disjoint regions paint one label map that gives every region back; regions
    that overlap without nesting could not, and are refused in one line."""
    from data.preprocess import parse_regions

    with pytest.raises(DataConfigError, match="A and B share the value 2 but neither holds the other"):
        Preprocess(label_mode="regions", regions=parse_regions("A:1,2;B:2,3"))
    tree = Preprocess(label_mode="regions", regions=parse_regions("ALL:1,2,3,5;LEFT:1,2;RIGHT:3;CORE:1;OTHER:7"))
    raw = np.array([[0, 1, 2, 3, 5, 7]])
    channels = tree.map_label(raw)
    np.testing.assert_array_equal(tree.map_label(tree.label_map(channels)), channels)


def test_nnunet_region_labels_become_the_regions_with_usable_names(tmp_path):
    """A region-based dataset.json: --label_mode regions takes its regions, names made safe for
    columns and files; multiclass mode takes its declared values."""
    root = make_nnunet(tmp_path / "Dataset003_R", two_d=False)
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "whole tumour (WT)": [1, 2], "core": 2}
    (root / "dataset.json").write_text(json.dumps(spec))
    ds = create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="regions"))
    assert ds.preprocess.regions == (("whole_tumour_WT", (1, 2)), ("core", (2,)))
    assert ds[1]["label"].shape == (2, 16, 16) and ds[1]["label"].sum() == 2 * 12
    classes = create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="multiclass"))
    assert classes.preprocess.classes == (1, 2)


def region_dataset(tmp_path, labels, **spec_extra):
    """An nnU-Net 3D dataset whose labels hold 1, 2 and 3, with the given dataset.json labels."""
    root = make_nnunet(tmp_path / "Dataset004_O", two_d=False)
    for case in ("case_a", "case_b", "case_c"):
        label = np.zeros((10, 12, 3), np.uint8)
        label[2:8, 2:9, 1], label[3:7, 3:8, 1], label[4:6, 4:6, 1] = 1, 2, 3
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label)
    spec = json.loads((root / "dataset.json").read_text())
    spec.update(labels=labels, **spec_extra)
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_nnunet_regions_class_order_paints_as_nnunet_does(tmp_path):
    """A dataset.json's regions_class_order is recorded and paints the label maps: oedema (2)
    stays 2 where the derived order would write 1. Records without one are unchanged."""
    labels = {"background": 0, "whole tumor": [1, 2, 3], "enhancing tumor": 3}
    root = region_dataset(tmp_path, labels, regions_class_order=[2, 3])
    pre = create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="regions")).preprocess
    assert pre.regions == (("whole_tumor", (1, 2, 3)), ("enhancing_tumor", (3,))) and pre.regions_class_order == (2, 3)
    raw = np.array([[0, 1, 2, 3]])
    np.testing.assert_array_equal(pre.label_map(pre.map_label(raw)), [[0, 2, 2, 3]])
    record = pre.to_dict()
    assert record["regions_class_order"] == [2, 3] and Preprocess.from_dict(json.loads(json.dumps(record))) == pre
    # A record made before the field existed loads, keeps its keys and paints in the derived order.
    old = {k: v for k, v in record.items() if k != "regions_class_order"}
    assert Preprocess.from_dict(old).to_dict() == old and "regions_class_order" not in Preprocess().to_dict()
    np.testing.assert_array_equal(Preprocess.from_dict(old).label_map(pre.map_label(raw)), [[0, 1, 1, 3]])
    with pytest.raises(DataConfigError, match=r"regions_class_order=\[2, 3\].*regions_class_order=\[\]"):
        Preprocess.from_dict(old).check_same_as(record, "preseg.pt")
    # Without regions_class_order: the derived order, as before.
    plain = region_dataset(tmp_path / "plain", labels)
    pre = create_dataset(plain, preprocess=Preprocess(image_size=16, label_mode="regions")).preprocess
    assert pre.regions_class_order == () and pre.to_dict() == old


@pytest.mark.parametrize("labels, order, problem", [
    ({"background": 0, "whole tumor": [1, 2, 3], "enhancing tumor": 3}, [2], "one value per region"),
    ({"background": 0, "whole tumor": [1, 2, 3], "enhancing tumor": 3}, [2, 1], "enhancing_tumor the value 1"),
    ({"background": 0, "enhancing tumor": [3], "whole tumor": [1, 2, 3]}, [3, 2], "label value 3 as 2"),
    ({"background": 0, "whole tumor": [1, 2, 3], "enhancing tumor": 3}, "2,3", "must be a list"),
])
def test_a_regions_class_order_that_does_not_fit_is_one_line_naming_the_dataset_json(tmp_path, labels, order,
                                                                                     problem):
    root = region_dataset(tmp_path, labels, regions_class_order=order)
    with pytest.raises(DataConfigError) as info:
        create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="regions"))
    message = str(info.value)
    assert "\n" not in message and str(root / "dataset.json") in message and problem in message, message


def test_mixed_brats_releases_need_classes_in_multiclass_mode(tmp_path):
    """2021 and 2023 cases in one folder: enhancing tumour is 4 in one and 3 in the other, so
    no default set of classes fits; binary mode and given classes read them as before."""
    root = make_brats3d(tmp_path / "mixed", cases=("BraTS2021_00001",))
    make_brats3d(root, cases=("BraTS-GLI-00002-000",), naming="2023")
    with pytest.raises(DataConfigError) as info:
        create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="multiclass"))
    message = str(info.value)
    assert "\n" not in message and str(root) in message and "give --classes" in message, message
    assert len(create_dataset(root, preprocess=SMALL)) == 12
    given = create_dataset(root, preprocess=Preprocess(image_size=16, label_mode="multiclass", classes=(1, 2, 3, 4)))
    assert given.preprocess.classes == (1, 2, 3, 4)


def test_label_values_must_be_positive():
    """Negative classes, region values or foreground labels are refused when the preprocessing is
    made (they would overflow the label maps' unsigned type when written)."""
    from data.preprocess import parse_regions

    for flags, message in ((dict(classes="-1,2"), "--classes must hold label values > 0, got -1"),
                           (dict(regions="WT:-2,1;ET:1"), "--regions WT must hold label values > 0, got -2"),
                           (dict(foreground_labels="-4"), "--foreground_labels must hold label values > 0, got -4")):
        with pytest.raises(DataConfigError) as info:
            preprocess_from_args(flags)
        assert str(info.value) == message
    with pytest.raises(DataConfigError, match="--classes must hold label values > 0"):
        Preprocess(label_mode="multiclass", classes=(3, -1))
    with pytest.raises(DataConfigError, match="--regions A must hold label values > 0"):
        parse_regions([("A", [-1])])
    # 0 keeps its own message.
    with pytest.raises(DataConfigError, match=r"^--foreground_labels must not contain 0 \(the background\)$"):
        Preprocess(label_mode="subset", foreground_labels=(0, 1))


def test_flags_of_a_raw_state_dict_are_named_only_where_classes_or_regions_differ():
    """The data flags stand for a raw state dict's preprocessing: a net trained with classes asks
    for its flags; one-channel runs keep the message they had; no flag sets regions_class_order."""
    classes = Preprocess(image_size=32, label_mode="multiclass", classes=(1, 2, 4)).to_dict()
    with pytest.raises(DataConfigError) as info:
        Preprocess(image_size=32, label_mode="multiclass").check_same_as(classes, "preseg.pt", from_flags=True)
    assert str(info.value) == ("preseg.pt was trained with classes=[1, 2, 4], but the data flags give classes=[]; "
                               "the diffusion model is a raw state dict, whose preprocessing comes from the data "
                               "flags: pass --classes 1,2,4")
    with pytest.raises(DataConfigError, match=r'pass --regions "WT:1,2,4;ET:4"$'):
        Preprocess(image_size=32).check_same_as(
            Preprocess(image_size=32, label_mode="regions", regions="WT:1,2,4;ET:4").to_dict(), "p.pt", from_flags=True)
    for from_flags in (False, True):
        with pytest.raises(DataConfigError) as info:
            Preprocess(image_size=64).check_same_as(Preprocess(image_size=32).to_dict(), "p.pt", from_flags=from_flags)
        assert str(info.value) == ("p.pt was trained with image_size=32, but the diffusion model with image_size=64; "
                                   "train all three networks with the same preprocessing")
    regions = (("WT", (1, 2, 3)), ("ET", (3,)))
    ordered = Preprocess(label_mode="regions", regions=regions, regions_class_order=(2, 3)).to_dict()
    Preprocess(label_mode="regions", regions=regions).check_same_as(ordered, "p.pt", from_flags=True)
