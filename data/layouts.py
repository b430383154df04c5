"""Finding the files of each on-disk layout, and recognising the layout of a folder.

Scanning only lists files and reads NIfTI headers; voxels are read when an item is loaded.
Errors that a listing can find (no files, a missing modality, a volume whose channels differ
in shape) are raised here, at construction, and an image and mask of different size when the
dataset is built (``datasets.check_geometry``, from the headers); errors in the voxels (NaN,
undeclared label values) when the file is loaded.

Layouts (``--dataset``):
  brats2d  slice folders of the improved-diffusion-based segmentation code: files
           ``<prefix>_<t1|t1ce|t2|flair|seg>_<slice>[_<tag>].nii[.gz]``; the patient is the
           trailing number of the prefix (brats_train_001_flair_080_w -> patient 001, slice 80).
  brats3d  BraTS volumes: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (2020/2021) or
           ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (2023), cut into slices on the fly.
  nnunet   nnU-Net raw: dataset.json + imagesTr/labelsTr (or a given images*/ folder).
  folder   ``images/`` + ``masks/`` with matching names (Kvasir-SEG and the like).
  isic     ``ISBI2016_ISIC_Part1_*_Data/ISIC_x.jpg`` + ``..._GroundTruth/ISIC_x_Segmentation.png``.
  lgg      masks beside their images marked by ``--mask_suffix``, searched recursively; the
           patient is the folder (the LGG FLAIR set: ``<P>/<P>_<n>.tif`` + ``<P>_<n>_mask.tif``).

Unlabelled input (new scans to segment): a folder that none of these layouts recognises but
that holds image files (PNG, JPEG, BMP, TIFF, or NIfTI slices or volumes) is read as unlabelled
cases of the layout a model was trained on (``trained_layout``, recorded in its checkpoint):
one case per file, or per ``<case>_XXXX.<ext>`` group of channel files (nnU-Net's
``imagesTs``); for an ``lgg`` model, the folders are the patients, as in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from data.errors import DataConfigError, DataError
from data.io import IMAGE_SUFFIXES, LOSSY_SUFFIXES, is_image, is_nifti, read_nifti_header, strip_suffix
from data.preprocess import regions_class_order_problem

LAYOUTS = ("brats2d", "brats3d", "nnunet", "folder", "isic", "lgg")
DATASET_CHOICES = ("auto",) + LAYOUTS

# Channel order of the improved-diffusion-based segmentation loader (t1, t1ce, t2, flair).
BRATS_CHANNELS = ("t1", "t1ce", "t2", "flair")
# BraTS 2023 renamed the sequences; they are the same four and keep the same names here, so a
# model trained on one release reads the other.
BRATS2023_MODALITIES = ("t1n", "t1c", "t2w", "t2f")
BRATS_LABELS = (0, 1, 2, 4)  # 2020/2021: necrotic core, oedema, enhancing tumour
BRATS2023_LABELS = (0, 1, 2, 3)  # 2023: enhancing tumour is 3
BINARY_LABELS = (0, 1)

_BRATS2D = re.compile(r"^(?P<prefix>.+?)_(?P<mod>t1ce|t1|t2|flair|seg)_(?P<slice>\d+)(?:_[^.]*)?\.nii(?:\.gz)?$", re.I)
_BRATS3D_2021 = re.compile(r"^(?P<case>.+)_(?P<mod>t1ce|t1|t2|flair|seg)\.nii(?:\.gz)?$", re.I)
_BRATS3D_2023 = re.compile(r"^(?P<case>.+)-(?P<mod>t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$", re.I)
# What no file system takes in a name (path separators, Windows' reserved characters, control
# characters); everything else, Unicode letters and spaces included, stays as the input named it.
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]+')
# Bytes of an id, so that "<id>_variance.nii.gz" and the temporary names fit in 255 bytes.
_MAX_ID_BYTES = 180


@dataclass
class SliceRecord:
    """One 2D item read from its own files (image files concatenated along channels)."""

    case_id: str
    patient_id: str
    image_files: list
    label_file: str | None
    volume_id: str | None = None
    slice_index: int | None = None


@dataclass
class VolumeRecord:
    """One 3D case; its slices along ``slice_axis`` are the items."""

    volume_id: str
    patient_id: str
    image_files: list
    label_file: str | None
    shape: tuple
    affine: list
    zooms: tuple
    slice_axis: int


@dataclass
class Scan:
    """What a layout scanner found under ``root``."""

    layout: str
    kind: str  # "nifti_slice" | "image" | "volume"
    root: str
    records: list
    channel_names: tuple | None  # None: taken from the first image (grey or RGB)
    declared_labels: tuple
    binary_masks: bool = False  # image masks stored as 0/1 or 0/255
    notes: dict = field(default_factory=dict)


def safe_id(text: str) -> str:
    """A case id that can name output files: the input's own name wherever a file system
    allows it (``病例 2`` stays ``病例 2``), with unsafe characters replaced by ``_``, no
    leading dot (hidden files) and, for a very long name, a shortened one with a hash."""
    ident = _UNSAFE.sub("_", str(text)).strip().lstrip(".").strip("_ ") or "case"
    if len(ident.encode("utf-8")) > _MAX_ID_BYTES:
        digest = hashlib.sha1(ident.encode("utf-8")).hexdigest()[:10]
        head = ident.encode("utf-8")[: _MAX_ID_BYTES - 11].decode("utf-8", "ignore")
        ident = f"{head}_{digest}"
    return ident


def scan(root: str, dataset: str = "auto", *, mask_suffix: str = "_mask", trained_layout: str = "",
         channel_names=()) -> Scan:
    """Scan ``root`` as the given layout (``auto``: recognise it). Raises DataError.

    trained_layout, channel_names: the layout and image channels a model was trained on; with
    ``auto``, a folder of images that no layout recognises is read as unlabelled input of them.
    """
    if dataset not in DATASET_CHOICES:
        raise DataConfigError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASET_CHOICES)}")
    if not root:
        raise DataConfigError("--data_dir is empty; give the folder that holds the data")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.exists(root):
        raise DataError(f"--data_dir {root} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"--data_dir {root} is not a folder")
    if not mask_suffix:
        raise DataConfigError("--mask_suffix must not be empty")
    walk = _walk(root)
    if not any(files for _, files in walk):
        raise DataError(f"data folder {root} is empty (no files under it)")
    if dataset == "auto":
        try:
            dataset = detect_layout(root, mask_suffix=mask_suffix, walk=walk)
        except DataError:
            found = scan_unlabelled(root, walk, trained_layout=trained_layout, channel_names=channel_names,
                                    mask_suffix=mask_suffix)
            if found is None:
                raise
            _dedupe_ids(found)
            return found
    scanner = {
        "brats2d": lambda: _scan_brats2d(root, walk),
        "brats3d": lambda: _scan_brats3d(root, walk),
        "nnunet": lambda: _scan_nnunet(root),
        "folder": lambda: _scan_folder(root, mask_suffix),
        "isic": lambda: _scan_isic(root),
        "lgg": lambda: _scan_lgg(root, walk, mask_suffix),
    }[dataset]
    result = scanner()
    _dedupe_ids(result)
    return result


def detect_layout(root: str, *, mask_suffix: str = "_mask", walk=None) -> str:
    """Name of the layout of ``root``; DataError naming what was looked for when none fits."""
    if _nnunet_root(root) is not None:
        return "nnunet"
    if _isic_dirs(root):
        return "isic"
    if os.path.isdir(os.path.join(root, "images")):
        return "folder"
    walk = _walk(root) if walk is None else walk
    has_3d = has_2d = has_lgg = False
    for _, files in walk:
        for f in files:
            if _brats3d_match(f) is not None:
                has_3d = True
            elif _BRATS2D.match(f):
                has_2d = True
            elif is_image(f) and strip_suffix(f).endswith(mask_suffix):
                has_lgg = True
    if has_3d:
        return "brats3d"
    if has_2d:
        return "brats2d"
    if has_lgg:
        return "lgg"
    raise DataError(
        f"cannot recognise the layout of {root}: looked for dataset.json (nnunet), "
        f"ISBI2016_ISIC_*_Data + *_GroundTruth folders (isic), images/ + masks/ (folder), "
        f"<case>/<case>_t1.nii.gz or <case>-t1n.nii.gz volumes (brats3d), "
        f"*_t1_*, *_t1ce_*, *_t2_*, *_flair_* NIfTI slices (brats2d), "
        f"images with <name>{mask_suffix}.<ext> masks beside them (lgg), image or NIfTI files "
        f"(unlabelled input); pass --dataset to choose one"
    )


def _walk(root: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.append((dirpath, sorted(f for f in filenames if not f.startswith("."))))
    return out


def _rel(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return "" if rel == "." else rel


def _dedupe_ids(result: Scan) -> None:
    """Make case ids unique by prefixing the folder of those that collide."""
    key = "volume_id" if result.kind == "volume" else "case_id"
    seen = {}
    for rec in result.records:
        seen.setdefault(getattr(rec, key), []).append(rec)
    for ident, recs in seen.items():
        if len(recs) > 1:
            for rec in recs:
                folder = _rel(result.root, os.path.dirname(rec.image_files[0]))
                setattr(rec, key, safe_id(f"{folder}_{ident}"))
    if len({getattr(r, key) for r in result.records}) != len(result.records):
        raise DataError(f"{result.root} holds several cases with the same name; rename them so that ids are unique")


# ---------------------------------------------------------------- BraTS 2D slice folders

def _scan_brats2d(root: str, walk) -> Scan:
    groups = {}
    for dirpath, files in walk:
        for f in files:
            m = _BRATS2D.match(f)
            if m is None:
                continue
            key = (dirpath, m.group("prefix"), m.group("slice"))
            mod = m.group("mod").lower()
            group = groups.setdefault(key, {})
            if mod in group:
                raise DataError(f"slice folder {dirpath} has two *_{mod}_* files for slice {m.group('slice')}: "
                                f"{os.path.basename(group[mod])} and {f}")
            group[mod] = os.path.join(dirpath, f)
    if not groups:
        raise DataError(f"no BraTS 2D slices (*_t1_*, *_t1ce_*, *_t2_*, *_flair_* NIfTI files) found under {root}")
    records = []
    for (dirpath, prefix, slice_text), group in sorted(groups.items()):
        missing = [m for m in BRATS_CHANNELS if m not in group]
        if missing:
            found = ", ".join(sorted(group)) or "none"
            raise DataError(f"slice folder {dirpath} has no *_{missing[0]}_* NIfTI file for slice {slice_text} "
                            f"(found: {found}; needs t1, t1ce, t2, flair)")
        digits = re.search(r"(\d+)$", prefix)
        records.append(SliceRecord(
            case_id=safe_id(f"{prefix}_{slice_text}"),
            patient_id=digits.group(1) if digits else safe_id(prefix),
            image_files=[group[m] for m in BRATS_CHANNELS],
            label_file=group.get("seg"),
            volume_id=safe_id(prefix),
            slice_index=int(slice_text),
        ))
    return Scan("brats2d", "nifti_slice", root, records, BRATS_CHANNELS, BRATS_LABELS)


# ---------------------------------------------------------------- BraTS 3D volumes

def _brats3d_match(name: str):
    m = _BRATS3D_2023.match(name)
    if m is not None:
        return m, "2023"
    m = _BRATS3D_2021.match(name)
    if m is not None:
        return m, "2021"
    return None


def _scan_brats3d(root: str, walk) -> Scan:
    groups = {}
    for dirpath, files in walk:
        for f in files:
            hit = _brats3d_match(f)
            if hit is None:
                continue
            m, naming = hit
            key = (dirpath, m.group("case"), naming)
            mod = m.group("mod").lower()
            group = groups.setdefault(key, {})
            if mod in group:
                raise DataError(f"case folder {dirpath} has two {mod} files: {os.path.basename(group[mod])} and {f}")
            group[mod] = os.path.join(dirpath, f)
    if not groups:
        raise DataError(f"no BraTS volumes (<case>_t1.nii.gz ... or <case>-t1n.nii.gz ...) found under {root}")
    records, namings = [], set()
    for (dirpath, case, naming), group in sorted(groups.items()):
        modalities = BRATS2023_MODALITIES if naming == "2023" else BRATS_CHANNELS
        sep = "-" if naming == "2023" else "_"
        missing = [m for m in modalities if m not in group]
        if missing:
            found = ", ".join(sorted(group))
            raise DataError(f"case folder {dirpath} has no {case}{sep}{missing[0]}.nii.gz (found: {found}; "
                            f"needs {', '.join(modalities)})")
        namings.add(naming)
        patient = re.sub(r"-\d{3}$", "", case) if naming == "2023" else case
        images = [group[m] for m in modalities]
        records.append(_volume_record(safe_id(case), safe_id(patient), images, group.get("seg")))
    labels = sorted(set(BRATS_LABELS if "2021" in namings else ()) | set(BRATS2023_LABELS if "2023" in namings else ()))
    notes = {}
    if len(namings) > 1:
        # Enhancing tumour is 4 in one release and 3 in the other: no one set of classes fits both.
        notes["label_conflict"] = ("BraTS 2020/2021 cases (<case>_t1.nii.gz, enhancing tumour 4) and BraTS 2023 "
                                   "cases (<case>-t1n.nii.gz, enhancing tumour 3)")
    return Scan("brats3d", "volume", root, records, BRATS_CHANNELS, tuple(labels), notes=notes)


def _volume_record(volume_id: str, patient_id: str, image_files: list, label_file: str | None) -> VolumeRecord:
    """Read the headers of a case; its channels and label must share one 3D grid."""
    first = read_nifti_header(image_files[0])
    shape = _as_3d(first.shape, image_files[0])
    for path in image_files[1:] + ([label_file] if label_file else []):
        other = _as_3d(read_nifti_header(path).shape, path)
        if other != shape:
            what = "mask" if path == label_file else "image"
            raise DataError(f"{what} {path} has shape {other} but {image_files[0]} has shape {shape}")
    slice_axis = axial_axis(first.affine) if len(first.shape) >= 3 and first.shape[2] > 1 else 2
    zooms = tuple(first.zooms) + (1.0,) * (3 - len(first.zooms))
    return VolumeRecord(volume_id, patient_id, list(image_files), label_file, shape, first.affine, zooms[:3],
                        slice_axis)


def axial_axis(affine) -> int:
    """The array axis of a volume cut into axial slices: the one that moves most along world z
    (inferior-superior)."""
    return int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[2, :3])))


def _as_3d(shape: tuple, path: str) -> tuple:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3:
        raise DataError(f"NIfTI file {path} has shape {shape}; expected a 3D volume")
    return shape


# ---------------------------------------------------------------- nnU-Net raw

def _nnunet_root(root: str):
    """(dataset folder, images folder name) when ``root`` is an nnU-Net dataset or images*/ in one."""
    if os.path.isfile(os.path.join(root, "dataset.json")):
        return root, "imagesTr"
    parent, name = os.path.split(root.rstrip(os.sep))
    if name.startswith("images") and os.path.isfile(os.path.join(parent, "dataset.json")):
        return parent, name
    return None


def _scan_nnunet(root: str) -> Scan:
    found = _nnunet_root(root)
    if found is None:
        raise DataError(f"no nnU-Net dataset.json in {root} (nor in its parent for an images*/ folder)")
    base, images_name = found
    json_path = os.path.join(base, "dataset.json")
    try:
        with open(json_path) as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {json_path}: {' '.join(str(exc).split())}") from None
    if not isinstance(spec, dict):
        raise DataError(f"{json_path} is not a JSON object")
    channels = spec.get("channel_names", spec.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise DataError(f"{json_path} has no channel_names (e.g. {{\"0\": \"T2\"}})")
    try:
        channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    except ValueError:
        raise DataError(f"{json_path}: channel_names keys must be channel numbers like \"0\"") from None
    declared = _nnunet_labels(spec.get("labels"), json_path)
    ending = str(spec.get("file_ending", ".nii.gz"))
    images_dir = os.path.join(base, images_name)
    labels_dir = os.path.join(base, "labels" + images_name[len("images"):])
    if not os.path.isdir(images_dir):
        raise DataError(f"nnU-Net dataset {base} has no {images_name}/ folder")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    cases = {}
    for f in sorted(os.listdir(images_dir)):
        if f.startswith(".") or not f.endswith(ending):
            continue
        m = pattern.match(f)
        if m is None:
            raise DataError(f"{os.path.join(images_dir, f)} is not named <case>_XXXX{ending} (XXXX = channel number)")
        cases.setdefault(m.group("case"), {})[int(m.group("ch"))] = os.path.join(images_dir, f)
    if not cases:
        raise DataError(f"no *_0000{ending} images in {images_dir}")
    two_d = not is_nifti(ending)
    expected = set(range(len(channel_names)))
    # nnU-Net's natural-image reader takes an RGB file as three channels (one _0000 file).
    rgb_files = two_d and len(channel_names) == 3 and all(set(ch) == {0} for ch in cases.values())
    records = []
    for case, files in sorted(cases.items()):
        if not rgb_files and set(files) != expected:
            missing = sorted(expected - set(files))
            if missing:
                raise DataError(f"case {case} in {images_dir} has no {case}_{missing[0]:04d}{ending} "
                                f"({json_path} declares {len(channel_names)} channels: {', '.join(channel_names)})")
            extra = sorted(set(files) - expected)
            raise DataError(f"{files[extra[0]]} is channel {extra[0]} but {json_path} declares only "
                            f"{len(channel_names)} channels")
        label = os.path.join(labels_dir, case + ending)
        label = label if os.path.isfile(label) else None
        image_files = [files[k] for k in sorted(files)]
        if two_d:
            records.append(SliceRecord(case_id=safe_id(case), patient_id=safe_id(case), image_files=image_files,
                                       label_file=label))
        else:
            records.append(_volume_record(safe_id(case), safe_id(case), image_files, label))
    kind = "image" if two_d else "volume"
    notes = {"file_ending": ending, "dataset_json": json_path}
    regions = _nnunet_regions(spec["labels"])
    if regions:
        notes["regions"] = regions
        order = _nnunet_regions_class_order(spec, regions, json_path)
        if order:
            notes["regions_class_order"] = order
    return Scan("nnunet", kind, root, records, channel_names, declared, notes=notes)


def _nnunet_labels(labels, json_path: str) -> tuple:
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{json_path} has no labels (e.g. {{\"background\": 0, \"tumour\": 1}})")
    if "ignore" in labels:
        # nnU-Net's sparse annotation: its pixels are unlabelled, and read as a class or as
        # foreground they would be wrong targets.
        raise DataError(f"{json_path} declares the ignore label {labels['ignore']!r} (sparse annotation), which "
                        "this suite does not support; give fully annotated labels without \"ignore\"")
    values = set()
    if all(str(k).isdigit() for k in labels) and all(isinstance(v, str) for v in labels.values()):
        values = {int(k) for k in labels}  # nnU-Net v1: {"0": "background", ...}
    else:
        for name, v in labels.items():
            items = v if isinstance(v, (list, tuple)) else [v]
            for item in items:
                if isinstance(item, bool) or not isinstance(item, int):
                    raise DataError(f"{json_path}: label {name!r} must be an integer (or a list of them), got {v!r}")
                values.add(item)
    values.add(0)
    return tuple(sorted(values))


def _nnunet_regions(labels: dict) -> tuple:
    """The regions of a region-based dataset.json (some label is a list of values, e.g.
    ``"whole tumor": [1, 2, 3]``): ((name, values), ...), each name made a column and file name
    (characters other than letters, digits, ``_`` and ``-`` become ``_``: ``whole_tumor``);
    () for a plain label set."""
    if not any(isinstance(v, (list, tuple)) for v in labels.values()):
        return ()
    regions = []
    for name, v in labels.items():
        values = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        if set(values) != {0}:
            safe = re.sub(r"[^0-9A-Za-z_-]+", "_", str(name)).strip("_") or f"region{len(regions) + 1}"
            regions.append((safe, values))
    return tuple(regions)


def _nnunet_regions_class_order(spec: dict, regions: tuple, json_path: str) -> tuple:
    """The dataset.json's ``regions_class_order`` (the value each region is painted with, as
    nnU-Net turns predicted regions into a label map), checked against its ``regions``; ()
    when it gives none."""
    order = spec.get("regions_class_order")
    if order is None:
        return ()
    if not isinstance(order, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in order):
        raise DataConfigError(f"{json_path}: regions_class_order must be a list of label values, one per "
                              f"region, got {order!r}")
    problem = regions_class_order_problem(regions, order)
    if problem:
        raise DataConfigError(f"{json_path}: {problem}")
    return tuple(order)


# ---------------------------------------------------------------- image folders

def _index_images(folder: str) -> dict:
    """Relative stem -> path for every image under ``folder`` (recursive)."""
    out = {}
    for dirpath, files in _walk(folder):
        for f in files:
            if is_image(f):
                rel = _rel(folder, os.path.join(dirpath, strip_suffix(f)))
                if rel in out:
                    raise DataError(f"two images named {rel} in {folder}: {os.path.basename(out[rel])} and {f}")
                out[rel] = os.path.join(dirpath, f)
    return out


def _scan_folder(root: str, mask_suffix: str) -> Scan:
    images_dir = os.path.join(root, "images")
    masks_dir = os.path.join(root, "masks")
    if not os.path.isdir(images_dir):
        raise DataError(f"no images/ folder in {root} (the folder layout is images/ + masks/ with matching names)")
    images = _index_images(images_dir)
    if not images:
        raise DataError(f"no images ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) in {images_dir}")
    masks = _index_images(masks_dir) if os.path.isdir(masks_dir) else {}
    used = set()
    records = []
    for rel, path in sorted(images.items()):
        key = rel if rel in masks else rel + mask_suffix
        mask = masks.get(key)
        if mask is not None:
            used.add(key)
        records.append(SliceRecord(case_id=safe_id(rel), patient_id=safe_id(rel), image_files=[path], label_file=mask))
    orphans = sorted(set(masks) - used)
    if orphans:
        raise DataError(f"mask {masks[orphans[0]]} has no image of the same name in {images_dir}")
    return Scan("folder", "image", root, records, None, BINARY_LABELS, binary_masks=True)


def _isic_dirs(root: str) -> list:
    """ISIC image folders (``*_Data``) at ``root`` or directly under it."""
    def is_data_dir(path):
        return path.rstrip(os.sep).endswith("_Data") and os.path.isdir(path) and any(
            is_image(f) for f in os.listdir(path))
    if is_data_dir(root):
        return [root]
    try:
        children = sorted(os.listdir(root))
    except OSError:
        return []
    return [os.path.join(root, c) for c in children
            if c.startswith("ISBI") and c.endswith("_Data") and is_data_dir(os.path.join(root, c))]


def _scan_isic(root: str) -> Scan:
    dirs = _isic_dirs(root)
    if not dirs:
        raise DataError(f"no ISIC image folder (ISBI2016_ISIC_Part1_*_Data) in {root}")
    if len(dirs) > 1:
        names = ", ".join(os.path.basename(d) for d in dirs)
        raise DataError(f"{root} holds several ISIC image folders ({names}); pass one of them as --data_dir")
    data_dir = dirs[0]
    truth_dir = data_dir.rstrip(os.sep)[: -len("_Data")] + "_GroundTruth"
    images = _index_images(data_dir)
    masks = _index_images(truth_dir) if os.path.isdir(truth_dir) else {}
    records = []
    for rel, path in sorted(images.items()):
        mask = masks.get(rel + "_Segmentation") or masks.get(rel)
        records.append(SliceRecord(case_id=safe_id(rel), patient_id=safe_id(rel), image_files=[path], label_file=mask))
    return Scan("isic", "image", root, records, None, BINARY_LABELS, binary_masks=True)


def _scan_lgg(root: str, walk, mask_suffix: str) -> Scan:
    records = []
    for dirpath, files in walk:
        stems = {strip_suffix(f): f for f in files if is_image(f)}
        for stem, f in stems.items():
            if stem.endswith(mask_suffix):
                if stem[: -len(mask_suffix)] not in stems:
                    image_stem = stem[: -len(mask_suffix)]
                    raise DataError(f"mask {os.path.join(dirpath, f)} has no image {image_stem}.* beside it")
                continue
            mask = stems.get(stem + mask_suffix)
            folder = _rel(root, dirpath)
            digits = re.search(r"_(\d+)$", stem)
            patient = safe_id(folder) if folder else safe_id(stem)
            records.append(SliceRecord(
                case_id=safe_id(stem), patient_id=patient, image_files=[os.path.join(dirpath, f)],
                label_file=os.path.join(dirpath, mask) if mask else None,
                volume_id=patient, slice_index=int(digits.group(1)) if digits else None))
    if not records:
        raise DataError(f"no images (with <name>{mask_suffix}.<ext> masks beside them) found under {root}")
    records.sort(key=lambda r: (r.patient_id, r.slice_index if r.slice_index is not None else -1, r.case_id))
    return Scan("lgg", "image", root, records, None, BINARY_LABELS, binary_masks=True)


# ---------------------------------------------------------------- unlabelled input

# nnU-Net names the channels of a case <case>_0000.<ext>, <case>_0001.<ext>, ...
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def scan_unlabelled(root: str, walk, *, trained_layout: str = "", channel_names=(),
                    mask_suffix: str = "_mask") -> Scan | None:
    """The image files under ``root`` as unlabelled cases (see the module docstring); None when
    there are none. Files are grouped into multi-channel cases by nnU-Net's channel suffix when
    every file carries one and the model has several channels, or was trained on nnU-Net data."""
    files = [os.path.join(d, f) for d, names in walk for f in names if is_image(f) or is_nifti(f)]
    if not files:
        return None
    niftis = [f for f in files if is_nifti(f)]
    if niftis and len(niftis) != len(files):
        other = next(f for f in files if not is_nifti(f))
        raise DataError(f"{root} holds both NIfTI files ({niftis[0]}) and images ({other}); "
                        "give a folder of one kind")
    notes = {"unlabelled": True}
    if not niftis and trained_layout == "lgg":
        found = _scan_lgg(root, walk, mask_suffix)
        found.notes.update(notes)
        return found
    stems = {f: strip_suffix(os.path.basename(f)) for f in files}
    grouped = all(_CHANNEL_FILE.match(s) for s in stems.values()) and (
        len(channel_names) > 1 or trained_layout == "nnunet")
    cases = {}
    for path in files:
        m = _CHANNEL_FILE.match(stems[path]) if grouped else None
        key = (os.path.dirname(path), m.group("case") if m else stems[path])
        cases.setdefault(key, {})[int(m.group("ch")) if m else 0] = path
    for (folder, case), channels in cases.items():
        expected = len(channel_names) or len(channels)
        if grouped and sorted(channels) != list(range(expected)):
            missing = sorted(set(range(expected)) - set(channels))
            what = f"no {case}_{missing[0]:04d} file" if missing else f"{len(channels)} channel files"
            raise DataError(f"case {case} in {folder} has {what}; the model reads {expected} channel(s) "
                            f"named <case>_0000 ... <case>_{expected - 1:04d}")
    items = [(safe_id(case), [channels[k] for k in sorted(channels)]) for (_, case), channels in sorted(cases.items())]
    layout = trained_layout or ("nnunet" if niftis or grouped else "folder")
    if not niftis:
        records = [SliceRecord(case_id=c, patient_id=c, image_files=paths, label_file=None) for c, paths in items]
        names = tuple(channel_names) if grouped else None
        return Scan(layout, "image", root, records, names, BINARY_LABELS, binary_masks=True, notes=notes)
    return _unlabelled_nifti(root, items, layout, tuple(channel_names), notes)


def _unlabelled_nifti(root: str, items: list, layout: str, channel_names: tuple, notes: dict) -> Scan:
    """NIfTI cases: 2D slices (a third axis of length 1 at most) or 3D volumes, not both."""
    shapes = {case: _as_3d(read_nifti_header(paths[0]).shape, paths[0]) for case, paths in items}
    volumes = [case for case, shape in shapes.items() if shape[2] > 1]
    if volumes and len(volumes) != len(items):
        flat = next(case for case in shapes if case not in volumes)
        raise DataError(f"{root} holds both 3D volumes ({volumes[0]}) and 2D slices ({flat}); "
                        "give a folder of one kind")
    n_channels = len(items[0][1])
    if len(channel_names) != n_channels:
        channel_names = tuple(f"channel{k}" for k in range(n_channels))
    if volumes:
        records = [_volume_record(case, case, paths, None) for case, paths in items]
        return Scan(layout, "volume", root, records, channel_names, BINARY_LABELS, notes=notes)
    records = [SliceRecord(case_id=case, patient_id=case, image_files=paths, label_file=None) for case, paths in items]
    return Scan(layout, "nifti_slice", root, records, channel_names, BINARY_LABELS, notes=notes)


def mask_is_lossy(path: str) -> bool:
    return path.lower().endswith(LOSSY_SUFFIXES)
