"""Data flags (defaults + help) and the one-call builders that scripts use.

    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, data_defaults(), DATA_HELP)
    args = parser.parse_args()
    train_set = dataset_from_args(args, "train")            # preprocessing from the flags
    config["preprocess"] = train_set.preprocess.to_dict()   # recorded in the checkpoint
    ...
    test_set = dataset_from_args(args, "all", preprocess=Preprocess.from_dict(config["preprocess"]))
"""

from __future__ import annotations

from data.datasets import create_dataset
from data.errors import DataConfigError
from data.layouts import DATASET_CHOICES
from data.preprocess import Preprocess, parse_classes, parse_foreground_labels, parse_regions


def data_defaults() -> dict:
    return dict(
        data_dir="",
        dataset="auto",
        image_size=256,
        resize_mode="crop_pad",
        label_mode="binary",
        foreground_labels="",
        classes="",
        regions="",
        split_by="patient",
        val_fraction=0.1,
        split_seed=0,
        augment=False,
        num_workers=0,
        mask_suffix="_mask",
    )


DATA_HELP = {
    "data_dir": "folder with the data; its layout is recognised unless --dataset names it",
    "dataset": f"data layout: {', '.join(DATASET_CHOICES)} (auto recognises brats2d slice folders, brats3d "
               "volumes, nnunet raw with dataset.json, folder images/+masks/, isic ISBI2016, lgg masks beside images)",
    "image_size": "side of the square network input; slices are centre-cropped/zero-padded or resized to it",
    "resize_mode": "crop_pad (centre crop or zero pad, exact inverse) or resize (bilinear image, nearest mask)",
    "label_mode": "binary: every non-zero label is foreground (BraTS whole tumour); subset: only "
                  "--foreground_labels; multiclass: one mask channel per label value (--classes, default the "
                  "dataset's labels); regions: one channel per overlapping region (--regions)",
    "foreground_labels": "comma-separated label values that count as foreground, e.g. 1,4 (BraTS tumour core); "
                         "implies --label_mode subset",
    "classes": "comma-separated label values segmented as separate classes, e.g. 1,2,4; implies "
               "--label_mode multiclass (empty with --label_mode multiclass: every non-zero label the "
               "dataset declares)",
    "regions": "overlapping regions, each NAME:values, separated by ';', e.g. \"WT:1,2,4;TC:1,4;ET:4\" "
               "(BraTS 2021; 2023: \"WT:1,2,3;TC:1,3;ET:3\"); implies --label_mode regions (empty with "
               "regions mode: the regions of an nnU-Net dataset.json)",
    "split_by": "patient (slices of one patient never in both train and val) or case",
    "val_fraction": "fraction of patients (or cases) held out for validation, in [0, 1)",
    "split_seed": "seed of the train/val split (fixed, so every trainer sees the same split)",
    "augment": "training augmentation: random crop/pad offset, flips and a small intensity jitter",
    "num_workers": "DataLoader worker processes (each keeps its own cache of decoded volumes)",
    "mask_suffix": "suffix marking a mask beside its image, e.g. _mask for x_1.tif + x_1_mask.tif (lgg, folder)",
}


def _get(args, key: str):
    if isinstance(args, dict):
        return args.get(key, data_defaults()[key])
    return getattr(args, key, data_defaults()[key])


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("yes", "true", "t", "y", "1"):
            return True
        if value.lower() in ("no", "false", "f", "n", "0"):
            return False
        raise DataConfigError(f"--augment must be True or False, got {value!r}")
    return bool(value)


def preprocess_from_args(args, channel_names=(), dataset: str = "") -> Preprocess:
    """The Preprocess the data flags describe (``args``: argparse namespace or dict).

    ``--foreground_labels`` (``--classes``, ``--regions``) given with the default
    ``--label_mode binary`` means subset (multiclass, regions) mode.
    channel_names/dataset are normally filled in by the dataset; pass them to record others.
    """
    labels = parse_foreground_labels(_get(args, "foreground_labels"))
    classes = parse_classes(_get(args, "classes"))
    regions = parse_regions(_get(args, "regions"))
    label_mode = _get(args, "label_mode")
    if label_mode == "binary":
        given = [mode for mode, value in (("subset", labels), ("multiclass", classes), ("regions", regions)) if value]
        if len(given) > 1:
            raise DataConfigError("give one of --foreground_labels, --classes and --regions")
        label_mode = given[0] if given else label_mode
    return Preprocess(
        image_size=_get(args, "image_size"),
        resize_mode=_get(args, "resize_mode"),
        label_mode=label_mode,
        foreground_labels=labels,
        classes=classes,
        regions=regions,
        channel_names=tuple(channel_names),
        dataset=dataset,
    )


def dataset_from_args(args, subset: str, preprocess: Preprocess | None = None, *,
                      require_labels: bool | None = None, **kwargs):
    """``create_dataset`` from the data flags.

    subset: "train" (augmented when --augment), "val" or "all".
    preprocess: a recorded transform (sample.py, resuming); None builds it from the flags.
    require_labels: None means True for "train"/"val" (trainers need masks), False for "all".
    kwargs: passed on to ``create_dataset`` (skip_empty_slices, cache_volumes).
    """
    if preprocess is None:
        preprocess = preprocess_from_args(args)
    if require_labels is None:
        require_labels = subset != "all"
    return create_dataset(
        _get(args, "data_dir"),
        dataset=_get(args, "dataset"),
        preprocess=preprocess,
        subset=subset,
        augment=_as_bool(_get(args, "augment")) and subset == "train",
        val_fraction=float(_get(args, "val_fraction")),
        split_by=_get(args, "split_by"),
        split_seed=int(_get(args, "split_seed")),
        mask_suffix=_get(args, "mask_suffix"),
        require_labels=require_labels,
        **kwargs,
    )
