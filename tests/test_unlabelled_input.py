"""New scans without labels: folders no layout recognises are read as unlabelled input of the
layout a model was trained on (``Preprocess.dataset`` and ``channel_names`` of its checkpoint)."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data import DataError, Preprocess, create_dataset

LGG_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lgg_flair"


def trained_on(layout: str, channels, size: int = 32) -> Preprocess:
    """The preprocessing a checkpoint of a model trained on ``layout`` records."""
    return Preprocess(image_size=size, resize_mode="resize", channel_names=tuple(channels), dataset=layout)


def one_line_error(fn) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def lgg_scans(tmp_path):
    """Two real LGG patients' TIFF slices, copied without their masks."""
    if not LGG_DIR.is_dir():
        pytest.skip(f"{LGG_DIR} is missing (../shared beside the repo)")
    root = tmp_path / "new_scans"
    for patient in sorted(p for p in LGG_DIR.iterdir() if p.is_dir())[:2]:
        (root / patient.name).mkdir(parents=True)
        for image in sorted(p for p in patient.glob("*.tif") if not p.stem.endswith("_mask"))[:3]:
            shutil.copy(image, root / patient.name / image.name)
    return root


def test_lgg_folders_without_masks_are_patients_of_an_lgg_model(lgg_scans):
    dataset = create_dataset(lgg_scans, preprocess=trained_on("lgg", ("R", "G", "B")), keep_original_label=True)
    assert dataset.layout == "lgg" and dataset.unlabelled_input and dataset.n_labelled == 0
    # The data names its planes; the model's recorded names count the same channels.
    assert len(dataset) == 6 and dataset.channel_names == ("pre-contrast", "FLAIR", "post-contrast")
    patients = sorted({dataset.records[i].patient_id for i in range(len(dataset))})
    assert patients == sorted(p.name for p in lgg_scans.iterdir())
    item = dataset[0]
    assert "label" not in item and "original_label" not in item
    assert item["image"].shape == (3, 32, 32) and item["meta"]["original_shape"] == [256, 256]
    # Without a model (no recorded layout) the same folder is still read: each image a case.
    plain = create_dataset(lgg_scans, preprocess=Preprocess(image_size=32))
    assert plain.layout == "folder" and plain.unlabelled_input and len(plain) == 6


def test_a_flat_folder_of_png_and_jpg(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("scan a.png", "scan_b.jpg"):
        Image.fromarray((rng.random((20, 30)) * 255).astype(np.uint8)).save(tmp_path / name)
    dataset = create_dataset(tmp_path, preprocess=trained_on("folder", ("gray",)))
    assert dataset.case_ids == ["scan a", "scan_b"] and dataset.channel_names == ("gray",)
    assert dataset[1]["meta"]["format"] == "image" and dataset[1]["image"].shape == (1, 32, 32)


def save_volume(path, shape=(12, 10, 4)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4)), str(path))


def test_nnunet_images_ts_without_dataset_json(tmp_path):
    """imagesTs copied out of its dataset: <case>_0000 ... files grouped into the model's channels."""
    scans = tmp_path / "imagesTs"
    scans.mkdir()
    for case in ("pat1", "pat2"):
        for channel in range(2):
            save_volume(scans / f"{case}_{channel:04d}.nii.gz")
    dataset = create_dataset(scans, preprocess=trained_on("nnunet", ("T2", "ADC"), size=16))
    assert dataset.kind == "volume" and dataset.channel_names == ("T2", "ADC")
    assert len(dataset) == 8 and dataset.case_ids[:2] == ["pat1_000", "pat1_001"]
    assert dataset[0]["image"].shape == (2, 16, 16)
    # A model with three channels: the missing file is named.
    message = one_line_error(lambda: create_dataset(scans, preprocess=trained_on("nnunet", ("T2", "ADC", "T1"))))
    assert "case pat1" in message and "no pat1_0002 file" in message
    # A one-channel model: each file is a case, and the channel counts differ.
    (scans / "pat2_0001.nii.gz").unlink()
    (scans / "pat1_0001.nii.gz").unlink()
    single = create_dataset(scans, preprocess=trained_on("brats2d", ("flair",), size=16))
    assert sorted({single.records[v].volume_id for v, _ in single.items}) == ["pat1_0000", "pat2_0000"]


def test_nifti_slices_become_slice_cases(tmp_path):
    for case in ("a", "b"):
        save_volume(tmp_path / f"{case}.nii.gz", shape=(12, 10))
    dataset = create_dataset(tmp_path, preprocess=trained_on("brats2d", ("flair",), size=16))
    assert dataset.kind == "nifti_slice" and dataset.case_ids == ["a", "b"]
    assert dataset[0]["meta"]["format"] == "nifti_slice"


def test_mixed_folders_and_training_on_new_scans_are_refused(tmp_path):
    save_volume(tmp_path / "vol.nii.gz")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "img.png")
    message = one_line_error(lambda: create_dataset(tmp_path))
    assert "both NIfTI files" in message and "vol.nii.gz" in message and "img.png" in message
    (tmp_path / "vol.nii.gz").unlink()
    message = one_line_error(lambda: create_dataset(tmp_path, subset="train", val_fraction=0, require_labels=True))
    assert message == f"no mask for {tmp_path / 'img.png'} (training needs a mask for every image)"
    slices = tmp_path / "slices"
    slices.mkdir()
    save_volume(slices / "flat.nii.gz", shape=(12, 10))
    save_volume(slices / "deep.nii.gz")
    assert "both 3D volumes (deep) and 2D slices (flat)" in one_line_error(lambda: create_dataset(slices))
