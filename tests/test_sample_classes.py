"""sample.py with several classes or regions: label maps in the dataset's values, uncertainty per
class or region, per-class metrics, 3D volumes and --preseg_dir label maps.

The checkpoints are tiny and untrained, written through guided_diffusion.checkpoint with the
configs the trainers record (diffusion_checkpoint_config, preseg.io.network_config): what
sample.py reads of them is their config and shapes, not the quality of their weights. Runs call
sample.py's ``main`` in this process (tests.test_sample.sample_main).
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data import Preprocess, create_dataset
from evaluation.metrics import METRIC_NAMES
from evaluation.outputs import load_record
from guided_diffusion.checkpoint import save_checkpoint
from guided_diffusion.script_util import create_model, diffusion_checkpoint_config, diffusion_defaults, unet_defaults
from preseg import PresegSource
from preseg.io import build_network_from_config, network_config, network_defaults
from tests.conftest import BRATS2D_MINI
from tests.test_sample import load_nifti, read_metrics, sample_main

SIZE = 32
STEPS, PRE_T, T = 20, 12, 8
MULTICLASS = Preprocess(image_size=SIZE, resize_mode="resize", label_mode="multiclass", classes=(2, 4))
REGIONS = Preprocess(image_size=SIZE, resize_mode="resize", label_mode="regions",
                     regions=(("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))))
REGION_FLAGS = ["--regions", "WT:1,2,4;TC:1,4;ET:4"]
TINY_UNET = dict(num_channels=8, num_res_blocks=1, attention_resolutions="", channel_mult="1,2")
NET = dict(network_defaults(), base_channels=8, depth=1)


def data_preprocess(data_dir, preprocess) -> Preprocess:
    """The preprocessing as a trainer records it: completed by the dataset."""
    return create_dataset(str(data_dir), preprocess=preprocess, subset="all").preprocess


def save_diffusion(path, preprocess, image_channels) -> Path:
    flags = {**unet_defaults(), **diffusion_defaults(), **TINY_UNET, "image_size": SIZE,
             "diffusion_steps": STEPS, "noise_schedule": "cosine"}
    channels = preprocess.num_mask_channels
    model_flags = {k: flags[k] for k in unet_defaults()}
    torch.manual_seed(0)
    model = create_model(image_size=SIZE, image_channels=image_channels, mask_channels=channels, **model_flags)
    config = diffusion_checkpoint_config(flags, image_channels=image_channels, preprocess=preprocess.to_dict(),
                                         mask_channels=channels)
    save_checkpoint(path, kind="diffusion", model_state=model.state_dict(), config=config)
    return path


def save_network(path, kind, preprocess, in_channels, **record) -> Path:
    config = network_config(NET, in_channels=in_channels, num_classes=preprocess.network_classes)
    config.update(record, preprocess=preprocess.to_dict(), args={})
    torch.manual_seed(1)
    save_checkpoint(path, kind=kind, model_state=build_network_from_config(config).state_dict(), config=config)
    return path


@pytest.fixture(scope="module")
def brats_nets(tmp_path_factory):
    """Multiclass (2, 4) diffusion, pre-segmentation and denoising checkpoints, and a regions
    diffusion checkpoint, for the BraTS fixture's four channels."""
    if not BRATS2D_MINI.is_dir():
        pytest.skip(f"fixture folder {BRATS2D_MINI} is missing (../shared beside the repo)")
    root = tmp_path_factory.mktemp("class_nets")
    data = BRATS2D_MINI / "training"
    multiclass, regions = data_preprocess(data, MULTICLASS), data_preprocess(data, REGIONS)
    schedule = dict(T=T, diffusion_steps=STEPS, noise_schedule="cosine", mask_space="pm1")
    return {
        "data": data,
        "multiclass": save_diffusion(root / "multiclass.pt", multiclass, 4),
        "preseg": save_network(root / "preseg.pt", "preseg", multiclass, 4),
        # Not conditioned on the image: the net reads x_T alone, one channel per class.
        "denoiser": save_network(root / "denoiser.pt", "denoiser", multiclass, multiclass.num_mask_channels,
                                 **schedule, denoiser_cond="none", image_channels=4),
        "regions": save_diffusion(root / "regions.pt", regions, 4),
    }


def seg_files(data: Path) -> dict:
    return {p.name.replace("_seg_", "_").replace("_w.nii.gz", ""): p for p in sorted(data.glob("*/*_seg_*.nii.gz"))}


def case_files(out: Path, folder: str) -> dict:
    return {p.name[: -len(".nii.gz")]: p for p in sorted((out / folder).glob("*.nii.gz"))}


def assert_per_class_tables(out: Path, names, n_cases: int, preseg: bool):
    rows = read_metrics(out)
    cases = [r for r in rows if r["kind"] == "case"]
    assert len(cases) == n_cases
    columns = set(rows[0])
    for name in names:
        assert {f"{name}_{m}" for m in (*METRIC_NAMES, "pred_voxels", "label_voxels")} <= columns
        assert (f"preseg_{name}_dice" in columns) == preseg
    for row in cases:
        dices = [float(row[f"{n}_dice"]) for n in names
                 if float(row[f"{n}_pred_voxels"]) or float(row[f"{n}_label_voxels"])]
        if dices:
            assert float(row["dice"]) == pytest.approx(np.mean(dices))
    for row in rows:
        # The un-prefixed counts are the union's: at least each class's, at most their sum
        # (the sum exactly for exclusive classes; overlapping regions count a voxel once).
        for count in ("pred_voxels", "label_voxels"):
            per_class = [int(row[f"{n}_{count}"]) for n in names]
            assert max(per_class) <= int(row[count]) <= sum(per_class)
            if names[0].startswith("class"):
                assert int(row[count]) == sum(per_class)
            else:
                assert int(row[count]) == int(row[f"WT_{count}"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["per_class"]) == list(names)
    metrics = summary["kinds"][summary["headline"]["kind"]]["metrics"]
    for name in names:
        assert summary["per_class"][name]["dice"] == metrics[f"{name}_dice"]["mean"]
    # Each class's or region's label values beside its means, as python -m evaluation gives them.
    values = {f"class{v}": [v] for v in MULTICLASS.classes} | {n: list(v) for n, v in REGIONS.regions}
    assert all(summary["per_class"][name]["label_values"] == values[name] for name in names)
    # The mean of the class means (nnU-Net's foreground_mean) opens the closing line's figures.
    defined = [m["dice"] for m in summary["per_class"].values() if m["dice"] is not None]
    assert summary["class_mean"]["dice"]["mean"] == pytest.approx(np.mean(defined))
    assert summary["results"].startswith(f"dice per {summary['headline']['kind']} by class: {names[0]} ")
    assert f"mean of the classes {summary['class_mean']['dice']['mean']:.4f}" in summary["results"]
    assert "over the classes present in each" in summary["results"] and "classes" in summary["conventions"]
    for name in names:
        assert set(summary["per_class"][name]["counts"]) == {"dice", "hd95"}
    return rows, summary


def test_multiclass_addpm_writes_label_maps_in_the_datasets_values(brats_nets, tmp_path, capfd):
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", brats_nets["data"], "--model_path", brats_nets["multiclass"],
                            "--preseg_path", brats_nets["preseg"], "--denoiser_path", brats_nets["denoiser"],
                            "--pre_t", PRE_T, "--num_ensemble", 2, "--save_preseg", True,
                            "--save_overlays", False, "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    segs = seg_files(brats_nets["data"])
    masks, presegs = case_files(out, "masks"), case_files(out, "preseg")
    assert set(masks) == set(presegs) == set(segs)
    for case_id, seg in segs.items():
        source = nib.load(str(seg))
        image, mask = load_nifti(masks[case_id])
        assert mask.shape == source.shape and mask.dtype == np.uint8
        np.testing.assert_allclose(image.affine, source.affine)
        assert set(np.unique(mask)) <= {0, 2, 4}
        assert set(np.unique(load_nifti(presegs[case_id])[1])) <= {0, 2, 4}
        names = {p.name for p in (out / "uncertainty").glob(case_id + "_*")}
        assert names == {f"{case_id}_{m}.nii.gz" for m in ("variance_class2", "variance_class4", "entropy")}
        _, entropy = load_nifti(out / "uncertainty" / f"{case_id}_entropy.nii.gz")
        assert entropy.min() >= 0 and entropy.max() <= np.log(3) + 1e-6
        # The record holds the hard channels; painted, they are the mask that was written.
        record = load_record(str(out / "cases" / f"{case_id}.npz"))
        assert record["mask"].shape == (2, *mask.shape[:2])
        np.testing.assert_array_equal(MULTICLASS.label_map(record["mask"]), mask.reshape(mask.shape[:2]))
        np.testing.assert_array_equal(MULTICLASS.label_map(record["label"]),
                                      np.asarray(source.dataobj).reshape(mask.shape[:2]))
    rows, summary = assert_per_class_tables(out, ("class2", "class4"), len(segs), preseg=True)
    # The fixture's slices belong to patients: the headline is per patient, per class too.
    assert summary["headline"]["kind"] == "patient"
    assert any(r["kind"] == "patient" and r["class4_label_voxels"] not in ("", "0") for r in rows)


def region_preseg_dir(data: Path, folder: Path) -> dict:
    """The cases' own label maps (values 0, 2, 4) as pre-segmentations, named by case id."""
    folder.mkdir()
    segs = seg_files(data)
    for case_id, seg in segs.items():
        shutil.copy(seg, folder / f"{case_id}.nii.gz")
    return segs


def test_raw_state_dict_takes_its_mask_channels_from_the_last_convolution(brats_nets, tmp_path, capfd):
    """A state dict of a 2-channel UNet samples with --classes 2,4 and the model flags; with one
    class, or with --learn_sigma True (two outputs per channel), the flags and the weights
    disagree, which is one error line naming both flags."""
    state = torch.load(brats_nets["multiclass"], map_location="cpu", weights_only=True)["model"]
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    flags = ["--data_dir", brats_nets["data"], "--model_path", raw, "--image_size", SIZE, "--resize_mode", "resize",
             "--num_channels", 8, "--num_res_blocks", 1, "--attention_resolutions", "", "--channel_mult", "1,2",
             "--diffusion_steps", STEPS, "--noise_schedule", "cosine", "--save_overlays", False, "--device", "cpu"]
    addpm = ["--preseg_path", brats_nets["preseg"], "--sampler", "addpm", "--final_step", "x0", "--pre_t", PRE_T,
             "--T", T]
    code, err = sample_main(capfd, *flags, *addpm, "--classes", "2,4", "--out_dir", tmp_path / "out")
    assert code == 0, err
    assert_per_class_tables(tmp_path / "out", ("class2", "class4"), 6, preseg=True)
    code, err = sample_main(capfd, *flags, "--sampler", "ddim", "--sampling_steps", 2, "--classes", "4",
                            "--out_dir", tmp_path / "one")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "gives 2 channels, but 1 mask channel with --learn_sigma False need 1" in err, err
    code, err = sample_main(capfd, *flags, "--sampler", "ddim", "--sampling_steps", 2, "--classes", "2,4",
                            "--learn_sigma", True, "--out_dir", tmp_path / "sigma")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "2 mask channels with --learn_sigma True need 4; check --learn_sigma" in err, err
    assert not (tmp_path / "sigma" / "metrics.csv").exists()


def test_raw_state_dict_with_a_preseg_net_of_other_labels_is_told_which_flags_to_pass(brats_nets, tmp_path, capfd):
    """A raw state dict takes its preprocessing from the data flags: a pre-segmentation net
    trained on --classes 2,4 that the flags do not match asks for those flags (one line), not
    for the networks to be retrained. Without any label flag the weights' two channels already
    disagree with the one foreground of the flags, which names the flags to check."""
    state = torch.load(brats_nets["multiclass"], map_location="cpu", weights_only=True)["model"]
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    flags = ["--data_dir", brats_nets["data"], "--model_path", raw, "--image_size", SIZE, "--resize_mode", "resize",
             "--num_channels", 8, "--num_res_blocks", 1, "--attention_resolutions", "", "--channel_mult", "1,2",
             "--diffusion_steps", STEPS, "--noise_schedule", "cosine", "--preseg_path", brats_nets["preseg"],
             "--sampler", "addpm", "--final_step", "x0", "--pre_t", PRE_T, "--T", T, "--device", "cpu",
             "--out_dir", tmp_path / "out"]
    code, err = sample_main(capfd, *flags, "--label_mode", "multiclass")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code != 0 and len(lines) == 1, err
    assert str(brats_nets["preseg"]) in lines[0] and "raw state dict" in lines[0], err
    assert lines[0].endswith("pass --classes 2,4") and "train all three" not in lines[0], err
    code, err = sample_main(capfd, *flags)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code != 0 and len(lines) == 1, err
    assert "gives 2 channels, but 1 mask channel with" in lines[0] and "--classes or --regions" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_label_values_a_png_cannot_hold_are_refused_before_anything_is_written(tmp_path, capfd):
    """Image inputs get 16-bit PNG label maps: a model whose classes reach 70000 is refused in
    one line before sampling, rather than writing 70000 as 4464."""
    data = tmp_path / "scans"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(1, 255, (20, 20), dtype=np.uint8)).save(data / f"{name}.png")
    preprocess = Preprocess(image_size=SIZE, resize_mode="resize", label_mode="multiclass", classes=(1, 70000))
    model = save_diffusion(tmp_path / "diffusion.pt", preprocess, 1)
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", data, "--model_path", model, "--sampler", "ddim",
                            "--sampling_steps", 2, "--save_overlays", False, "--device", "cpu", "--out_dir", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert str(data) in lines[0] and "label value 70000" in lines[0] and "65535" in lines[0], err
    assert not out.exists()


def test_regions_from_a_preseg_dir_of_label_maps(brats_nets, tmp_path, capfd):
    segs = region_preseg_dir(brats_nets["data"], tmp_path / "presegs")
    # The preseg sampler at the input's own size: the label maps come back as they went in,
    # painted WT 2, TC 1, ET 4, and score 1 in every region.
    out = tmp_path / "preseg"
    code, err = sample_main(capfd, "--data_dir", brats_nets["data"], "--sampler", "preseg", *REGION_FLAGS,
                            "--image_size", 240, "--preseg_dir", tmp_path / "presegs", "--save_overlays", False,
                            "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    for case_id, seg in segs.items():
        np.testing.assert_array_equal(load_nifti(out / "masks" / f"{case_id}.nii.gz")[1],
                                      np.asarray(nib.load(str(seg)).dataobj))
        names = {p.name for p in (out / "uncertainty").glob(case_id + "_*")}
        assert names == {f"{case_id}_{m}_{r}.nii.gz" for m in ("variance", "entropy") for r in ("WT", "TC", "ET")}
    rows, _ = assert_per_class_tables(out, ("WT", "TC", "ET"), len(segs), preseg=True)
    for row in rows:
        assert all(float(row[f"{r}_dice"]) == 1.0 for r in ("WT", "TC", "ET"))

    # The regions diffusion model started from them, its own x0 as the final step.
    out = tmp_path / "addpm"
    code, err = sample_main(capfd, "--data_dir", brats_nets["data"], "--model_path", brats_nets["regions"],
                            "--preseg_dir", tmp_path / "presegs", "--final_step", "x0", "--T", T,
                            "--pre_t", PRE_T, "--num_ensemble", 2, "--fusion", "vote", "--save_overlays", False,
                            "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    for case_id in segs:
        assert set(np.unique(load_nifti(out / "masks" / f"{case_id}.nii.gz")[1])) <= {0, 1, 2, 4}
    assert_per_class_tables(out, ("WT", "TC", "ET"), len(segs), preseg=True)


def test_a_preseg_label_value_no_region_covers_is_one_error_line(brats_nets, tmp_path, capfd):
    segs = region_preseg_dir(brats_nets["data"], tmp_path / "presegs")
    case_id = next(iter(segs))
    image = nib.load(str(segs[case_id]))
    values = np.asarray(image.dataobj).copy()
    values[0, 0] = 3
    bad = tmp_path / "presegs" / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(values, image.affine), str(bad))
    code, err = sample_main(capfd, "--data_dir", brats_nets["data"], "--sampler", "preseg", *REGION_FLAGS,
                            "--image_size", SIZE, "--resize_mode", "resize", "--preseg_dir", tmp_path / "presegs",
                            "--device", "cpu", "--out_dir", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert str(bad) in lines[0] and "label value 3" in lines[0]


def write_nnunet_volumes(root: Path) -> Path:
    """An nnU-Net raw 3D dataset: one channel, labels 1 and 2 in dataset.json, one case."""
    shape = (20, 18, 4)
    affine = np.diag([1.1, 0.9, 2.5, 1.0])
    y, x, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(y - 9) ** 2 + (x - 9) ** 2 < 36] = 1
    seg[((y - 9) ** 2 + (x - 9) ** 2 < 9) & (z > 0)] = 2
    image = (seg * 40.0 + 100.0 + np.random.default_rng(0).normal(0, 3, shape)).astype(np.float32)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / "vol_0000.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), str(root / "labelsTr" / "vol.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "edema": 1, "core": 2},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def test_3d_multiclass_volume_is_reassembled_into_a_label_map(tmp_path, capfd):
    data = write_nnunet_volumes(tmp_path / "Dataset001_Vol")
    # --classes empty: the dataset.json labels (1, 2).
    preprocess = data_preprocess(data, Preprocess(image_size=SIZE, resize_mode="resize", label_mode="multiclass"))
    assert preprocess.classes == (1, 2)
    model = save_diffusion(tmp_path / "diffusion.pt", preprocess, 1)
    presegs = tmp_path / "presegs"
    presegs.mkdir()
    shutil.copy(data / "labelsTr" / "vol.nii.gz", presegs / "vol.nii.gz")
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", data, "--model_path", model, "--preseg_dir", presegs,
                            "--final_step", "x0", "--T", T, "--pre_t", PRE_T, "--num_ensemble", 2,
                            "--save_preseg", True, "--save_overlays", False, "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    source = nib.load(str(data / "labelsTr" / "vol.nii.gz"))
    for name in ("masks/vol.nii.gz", "preseg/vol.nii.gz", "uncertainty/vol_variance_class1.nii.gz",
                 "uncertainty/vol_variance_class2.nii.gz", "uncertainty/vol_entropy.nii.gz"):
        image, volume = load_nifti(out / name)
        assert volume.shape == source.shape, name
        np.testing.assert_allclose(image.affine, source.affine, err_msg=name)
    _, mask = load_nifti(out / "masks" / "vol.nii.gz")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
    for k in range(source.shape[2]):
        record = load_record(str(out / "cases" / f"vol_{k:03d}.npz"))
        np.testing.assert_array_equal(mask[:, :, k], preprocess.label_map(record["mask"]))
    rows = read_metrics(out)
    (volume_row,) = [r for r in rows if r["kind"] == "volume"]
    seg = np.asarray(source.dataobj)
    for value in (1, 2):
        assert int(volume_row[f"class{value}_label_voxels"]) == int((seg == value).sum())
        assert int(volume_row[f"class{value}_pred_voxels"]) == int((mask == value).sum())
        # The pre-segmentation is the label itself.
        assert float(volume_row[f"preseg_class{value}_dice"]) == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headline"]["kind"] == "volume" and set(summary["per_class"]) == {"class1", "class2"}


def test_a_raw_state_dict_paints_in_the_regions_class_order_of_its_preseg_net(tmp_path):
    """No flag gives nnU-Net's regions_class_order: a raw state dict's run takes it from a
    pre-segmentation net trained on the same regions, so its label maps are painted as the
    net's dataset.json says (oedema 2, not the derived 1)."""
    regions = (("whole_tumor", (1, 2, 3)), ("enhancing_tumor", (3,)))
    trained = Preprocess(image_size=SIZE, label_mode="regions", regions=regions, regions_class_order=(2, 3))
    path = save_network(tmp_path / "preseg.pt", "preseg", trained, in_channels=4)
    flags = Preprocess(image_size=SIZE, label_mode="regions", regions=regions)
    assert flags.paint_order() == [(0, 1), (1, 3)]
    source = PresegSource.from_flags(preseg_path=str(path), preprocess=flags, preprocess_from_flags=True)
    assert source.preprocess.paint_order() == [(0, 2), (1, 3)]
    np.testing.assert_array_equal(source.preprocess.label_map(np.array([[[0, 1, 1]], [[0, 0, 1]]])), [[0, 2, 3]])
    # A network's own record is never overridden: a checkpoint's preprocessing is compared as it is.
    other = Preprocess(image_size=SIZE, label_mode="regions", regions=regions, regions_class_order=(1, 3))
    assert other.with_order_of(trained.to_dict()) is other
