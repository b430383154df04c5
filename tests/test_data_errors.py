"""Bad input on disk: each case is one DataError line that names the file (or flag) at fault."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data import DataConfigError, DataError, Preprocess, create_dataset, create_loader
from guided_diffusion.errors import AddpmError, ConfigError

SMALL = Preprocess(image_size=16)
MODS = ("t1", "t1ce", "t2", "flair")


def write_nifti(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), str(path))


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(str(path))


def slice_folder(folder, seg=None, mods=MODS, shape=(10, 10), patient=1):
    for mod in mods:
        img = np.zeros(shape, np.float32)
        img[2:-2, 2:-2] = 5.0 + np.arange((shape[0] - 4) * (shape[1] - 4)).reshape(shape[0] - 4, shape[1] - 4)
        write_nifti(folder / f"brats_train_{patient:03d}_{mod}_005_w.nii.gz", img)
    if seg is not None:
        write_nifti(folder / f"brats_train_{patient:03d}_seg_005_w.nii.gz", seg)
    return folder


def raises_one_line(fn, match_file, cls=DataError):
    with pytest.raises(cls) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    assert str(match_file) in message, message
    assert isinstance(info.value, AddpmError)
    return message


def test_missing_folder_and_empty_folder(tmp_path):
    raises_one_line(lambda: create_dataset(tmp_path / "nope"), tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    msg = raises_one_line(lambda: create_dataset(tmp_path / "empty"), tmp_path / "empty")
    assert "empty" in msg
    (tmp_path / "img" / "images").mkdir(parents=True)
    (tmp_path / "img" / "readme.txt").write_text("x")
    raises_one_line(lambda: create_dataset(tmp_path / "img", dataset="folder"), tmp_path / "img" / "images")


def test_unrecognised_layout_names_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    msg = raises_one_line(lambda: create_dataset(tmp_path), tmp_path)
    for looked_for in ("dataset.json", "images/", "_t1_", "_mask", "--dataset"):
        assert looked_for in msg


def test_unknown_dataset_is_a_config_error(tmp_path):
    with pytest.raises(DataConfigError) as info:
        create_dataset(tmp_path, dataset="brats9d")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, DataError)
    assert "brats9d" in str(info.value) and "brats2d" in str(info.value) and "lgg" in str(info.value)


def test_slice_folder_missing_a_modality(tmp_path):
    folder = slice_folder(tmp_path / "d" / "000001", mods=("t1", "t1ce", "flair"))
    msg = raises_one_line(lambda: create_dataset(tmp_path / "d", preprocess=SMALL), folder)
    assert "t2" in msg


def test_brats3d_missing_modality_and_shape_mismatch(tmp_path):
    case = tmp_path / "v" / "BraTS2021_00001"
    for mod in ("t1", "t1ce", "t2"):
        write_nifti(case / f"BraTS2021_00001_{mod}.nii.gz", np.ones((6, 6, 3), np.int16))
    msg = raises_one_line(lambda: create_dataset(tmp_path / "v"), case)
    assert "flair" in msg
    write_nifti(case / "BraTS2021_00001_flair.nii.gz", np.ones((6, 6, 3), np.int16))
    write_nifti(case / "BraTS2021_00001_seg.nii.gz", np.zeros((6, 6, 4), np.uint8))
    raises_one_line(lambda: create_dataset(tmp_path / "v"), case / "BraTS2021_00001_seg.nii.gz")


def test_image_and_mask_of_different_shapes_fail_when_the_dataset_is_built(tmp_path):
    write_png(tmp_path / "f" / "images" / "a.png", np.full((12, 12, 3), 9))
    write_png(tmp_path / "f" / "masks" / "a.png", np.zeros((10, 12)))
    msg = raises_one_line(lambda: create_dataset(tmp_path / "f", preprocess=SMALL), tmp_path / "f" / "masks" / "a.png")
    assert "(10, 12)" in msg and "(12, 12)" in msg
    seg_folder = slice_folder(tmp_path / "s" / "000001", seg=np.zeros((8, 10)))
    raises_one_line(lambda: create_dataset(tmp_path / "s", preprocess=SMALL),
                    seg_folder / "brats_train_001_seg_005_w.nii.gz")


def test_corrupt_nifti(tmp_path):
    folder = slice_folder(tmp_path / "d" / "000001")
    bad = folder / "brats_train_001_t2_005_w.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated download
    # The headers are read when the dataset is built (to check the sizes): it fails there.
    raises_one_line(lambda: create_dataset(tmp_path / "d", preprocess=SMALL), bad)
    bad.write_bytes(gzip.compress(b"this is not a nifti header at all" * 20))
    raises_one_line(lambda: create_dataset(tmp_path / "d", preprocess=SMALL), bad)
    # A header that reads but voxels that do not: when the item is loaded.
    bad.write_bytes(data)
    ds = create_dataset(tmp_path / "d", preprocess=SMALL)
    bad.write_bytes(gzip.compress(gzip.decompress(data)[:400]))
    raises_one_line(lambda: ds[0], bad)


def test_corrupt_volume_header_found_at_construction(tmp_path):
    case = tmp_path / "v" / "BraTS2021_00001"
    for mod in ("t1", "t1ce", "t2", "flair"):
        write_nifti(case / f"BraTS2021_00001_{mod}.nii.gz", np.ones((6, 6, 3), np.int16))
    bad = case / "BraTS2021_00001_t1ce.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    raises_one_line(lambda: create_dataset(tmp_path / "v"), bad)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_file_that_is_not_an_image(tmp_path):
    (tmp_path / "f" / "images").mkdir(parents=True)
    fake = tmp_path / "f" / "images" / "a.png"
    fake.write_text("just some text, not a picture")
    msg = raises_one_line(lambda: create_dataset(tmp_path / "f", preprocess=SMALL), fake)
    assert "not an image" in msg
    write_png(tmp_path / "g" / "P" / "P_1.tif", np.full((8, 8, 3), 7))
    mask = tmp_path / "g" / "P" / "P_1_mask.tif"
    mask.write_bytes(b"II*\x00 broken tiff")
    raises_one_line(lambda: create_dataset(tmp_path / "g", preprocess=SMALL), mask)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad_value):
    folder = slice_folder(tmp_path / "d" / "000001")
    img = np.ones((10, 10), np.float32)
    img[3, 4] = bad_value
    bad = folder / "brats_train_001_flair_005_w.nii.gz"
    write_nifti(bad, img)
    ds = create_dataset(tmp_path / "d", preprocess=SMALL)
    msg = raises_one_line(lambda: ds[0], bad)
    assert "NaN or inf" in msg


def test_nan_in_volume(tmp_path):
    case = tmp_path / "v" / "BraTS2021_00001"
    for mod in ("t1", "t1ce", "t2", "flair"):
        vol = np.ones((6, 6, 3), np.float32)
        if mod == "t2":
            vol[1, 1, 1] = np.nan
        write_nifti(case / f"BraTS2021_00001_{mod}.nii.gz", vol)
    ds = create_dataset(tmp_path / "v", preprocess=SMALL)
    raises_one_line(lambda: ds[0], case / "BraTS2021_00001_t2.nii.gz")


def test_mask_with_undeclared_values(tmp_path):
    seg = np.zeros((10, 10))
    seg[4, 4], seg[5, 5] = 3, 7
    folder = slice_folder(tmp_path / "d" / "000001", seg=seg)
    ds = create_dataset(tmp_path / "d", preprocess=SMALL)
    msg = raises_one_line(lambda: ds[0], folder / "brats_train_001_seg_005_w.nii.gz")
    assert "3, 7" in msg and "0, 1, 2, 4" in msg
    write_png(tmp_path / "f" / "images" / "a.png", np.full((12, 12, 3), 9))
    mask = np.zeros((12, 12))
    mask[2, 2], mask[3, 3] = 255, 128
    write_png(tmp_path / "f" / "masks" / "a.png", mask)
    ds = create_dataset(tmp_path / "f", preprocess=SMALL)
    msg = raises_one_line(lambda: ds[0], tmp_path / "f" / "masks" / "a.png")
    assert "128" in msg


def test_nnunet_bad_inputs(tmp_path):
    root = tmp_path / "Dataset003_Z"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text("{not json")
    raises_one_line(lambda: create_dataset(root), root / "dataset.json")
    spec = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1},
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    write_nifti(root / "imagesTr" / "c1_0000.nii.gz", np.ones((5, 5, 2), np.float32))
    raises_one_line(lambda: create_dataset(root), root / "imagesTr")


def test_require_labels_on_unlabelled_data(tmp_path):
    folder = slice_folder(tmp_path / "d" / "000001")
    raises_one_line(lambda: create_dataset(tmp_path / "d", preprocess=SMALL, require_labels=True),
                    folder / "brats_train_001_t1_005_w.nii.gz")


def test_bad_flags(tmp_path):
    slice_folder(tmp_path / "d" / "000001")
    with pytest.raises(DataConfigError, match="subset"):
        create_dataset(tmp_path / "d", subset="test")
    with pytest.raises(DataConfigError, match="val_fraction"):
        create_dataset(tmp_path / "d", val_fraction=1.5)
    with pytest.raises(DataError, match="single patient"):
        create_dataset(tmp_path / "d", subset="train")
    with pytest.raises(DataConfigError, match="image_size"):
        Preprocess(image_size=0)
    with pytest.raises(DataError, match="4 channels .* expects 3"):
        create_dataset(tmp_path / "d", preprocess=Preprocess(image_size=16, channel_names=("R", "G", "B")))


def test_worker_errors_stay_one_line(tmp_path):
    folder = slice_folder(tmp_path / "d" / "000001")
    slice_folder(tmp_path / "d" / "000002", patient=2)
    img = np.ones((10, 10), np.float32)
    img[0, 0] = np.nan
    bad = folder / "brats_train_001_t1_005_w.nii.gz"
    write_nifti(bad, img)
    loader = create_loader(create_dataset(tmp_path / "d", preprocess=SMALL), batch_size=1, num_workers=2)
    message = None
    # No pytest.raises here: the exception it keeps would hold the loader's iterator in a
    # reference cycle, and a worker shutdown from the garbage collector waits 5 s per worker.
    # Dropping the traceback frees the iterator (and stops its workers) at once.
    try:
        for _ in loader:
            pass
    except DataError as exc:
        message = str(exc)
        exc.__traceback__ = None
    assert message is not None and "\n" not in message and str(bad) in message, message


def test_masks_drawn_in_the_alpha_channel_read_the_same_everywhere(tmp_path):
    """RGBA masks, white everywhere with the mask as opacity (as some annotation tools save
    them): the training data, python -m evaluation and --preseg_dir read the alpha channel."""
    from evaluation.cli import evaluate_folders
    from data.precomputed import read_precomputed_preseg

    truth = np.zeros((12, 12), dtype=np.uint8)
    truth[3:7, 2:9] = 1
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = truth * 255
    write_png(tmp_path / "f" / "images" / "a.png", np.full((12, 12, 3), 90))
    (tmp_path / "f" / "masks").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "f" / "masks" / "a.png")
    np.testing.assert_array_equal(create_dataset(tmp_path / "f", preprocess=Preprocess(image_size=12))[0]["label"], truth)

    (tmp_path / "labels").mkdir()
    write_png(tmp_path / "labels" / "a.png", truth * 255)
    rows, _ = evaluate_folders(tmp_path / "f" / "masks", tmp_path / "labels")
    assert rows[0]["dice"] == 1.0
    preseg = read_precomputed_preseg(str(tmp_path / "f" / "masks"), "a", {"format": "image", "original_shape": [12, 12]})
    np.testing.assert_array_equal(preseg, truth)

    # Colour and alpha that both draw a mask, and disagree: refused, not guessed.
    rgba[..., :3] = 0
    rgba[8:11, 8:11, :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "f" / "masks" / "a.png")
    bad = tmp_path / "f" / "masks" / "a.png"
    message = raises_one_line(lambda: create_dataset(tmp_path / "f", preprocess=SMALL)[0], bad)
    assert "alpha" in message
    raises_one_line(lambda: evaluate_folders(tmp_path / "f" / "masks", tmp_path / "labels"), bad)


@pytest.mark.parametrize("label_mode", ["binary", "multiclass", "regions"])
def test_nnunet_ignore_label_is_refused_in_every_label_mode(tmp_path, label_mode):
    """nnU-Net's ignore label marks unannotated pixels (sparse annotation): read as a class, a
    region or foreground they would be wrong targets, so such a dataset is refused."""
    root = tmp_path / "Dataset005_Sparse"
    label = np.zeros((6, 6, 2), np.uint8)
    label[1:3, 1:3], label[4:, 4:] = 1, 4
    write_nifti(root / "imagesTr" / "c1_0000.nii.gz", np.ones((6, 6, 2), np.float32))
    write_nifti(root / "labelsTr" / "c1.nii.gz", label)
    # A list makes the labels regions (nnU-Net's region-based dataset.json).
    labels = {"background": 0, "tumour": [1] if label_mode == "regions" else 1, "ignore": 4}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": labels,
                                                   "file_ending": ".nii.gz"}))
    preprocess = Preprocess(image_size=8, label_mode=label_mode)
    message = raises_one_line(lambda: create_dataset(root, preprocess=preprocess), root / "dataset.json")
    assert "ignore label 4" in message


def test_image_folder_masks_of_several_values_point_at_the_nnunet_layout(tmp_path):
    """The folder layouts read binary masks: with classes or regions, a mask of values 0, 1, 2
    says where label maps of several values are read; binary mode's message is as it was."""
    write_png(tmp_path / "f" / "images" / "a.png", np.full((12, 12, 3), 90))
    mask = np.zeros((12, 12))
    mask[2:5, 2:5], mask[3, 3] = 1, 2
    write_png(tmp_path / "f" / "masks" / "a.png", mask)
    bad = tmp_path / "f" / "masks" / "a.png"
    binary = raises_one_line(lambda: create_dataset(tmp_path / "f", preprocess=SMALL)[0], bad)
    assert binary.endswith("expected a binary mask with values 0/1 or 0/255")
    for preprocess in (Preprocess(image_size=16, label_mode="multiclass"),
                       Preprocess(image_size=16, label_mode="regions", regions="A:1")):
        message = raises_one_line(lambda: create_dataset(tmp_path / "f", preprocess=preprocess)[0], bad)
        assert message.startswith(binary) and "folder layout reads binary masks" in message
        assert "nnunet layout" in message
    message = raises_one_line(lambda: create_dataset(tmp_path / "f", preprocess=Preprocess(
        image_size=16, label_mode="multiclass", classes=(1, 2))), tmp_path / "f", cls=DataConfigError)
    assert "--classes 2 is not a label" in message and "nnunet layout" in message


def test_png_label_maps_refuse_values_above_16_bits(tmp_path):
    """A PNG holds 16 bits: a label value above 65535 is refused before the file is written,
    rather than wrapped (70000 would have been written as 4464)."""
    from data.writers import write_slice

    labels = np.zeros((4, 4), np.int32)
    labels[1, 1], labels[2, 2] = 3, 70000
    message = raises_one_line(lambda: write_slice(str(tmp_path / "a"), labels, {"format": "image"}, label_map=True),
                              tmp_path / "a.png")
    assert "label value 70000" in message and "65535" in message
    assert not list(tmp_path.iterdir())
    labels[2, 2] = 65535
    path = write_slice(str(tmp_path / "a"), labels, {"format": "image"}, label_map=True)
    assert np.asarray(Image.open(path)).max() == 65535
