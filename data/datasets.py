"""Datasets: every layout yields the same item dict, built by the one ``Preprocess``.

An item is ``{"image": float32 [C, S, S], "label": int64 {0, 1} (absent when the case has no
mask), "case_id": str, "meta": dict}``; the label is [S, S] in the one-channel label modes and
[K, S, S], one channel per class or region, in multiclass and regions mode
(``Preprocess.map_label``). ``meta`` holds plain python values only
(str, int, float, lists, None) so that it pickles cheaply across DataLoader workers:

  source_files    image files (channel order) then the mask file, if any
  format          "nifti_slice" | "nifti_volume_slice" | "image" (``data.formats``)
  layout          the --dataset layout that read it
  original_shape  [H, W] of the slice before preprocessing
  spacing         [sy, sx] in mm of the slice plane (1.0 for images)
  affine          4x4 nested list of the NIfTI file, None for images
  reference_file  the file whose header outputs copy (the first channel's file)
  patient_id      the patient (or case) that splits keep together
  volume_id       the volume the slice belongs to (None for lone images)
  slice_index     index of the slice in its volume, None where unknown
  volume_shape    [X, Y, Z] of the volume for volume slices, else None
  slice_axis      array axis of the volume that was sliced, else None
  geometry        the crop/pad or resize applied (see ``preprocess.geometry_plan``)

For a volume slice ``volume[(slice(None),) * slice_axis + (slice_index,)]`` is the slice, in
array order, so predictions stack back into the volume and are saved with ``affine`` and the
header of ``reference_file``.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from data.errors import DataConfigError, DataError
from data.formats import NIFTI_SLICE, NIFTI_VOLUME_SLICE, item_format
from data.io import check_finite, plane_shape, read_image, read_nifti
from data.layouts import Scan, SliceRecord, VolumeRecord, mask_is_lossy, scan
from data.preprocess import (LABEL_FLAGS, SINGLE_CHANNEL_MODES, Preprocess, as_int_label, binary_mask_labels,
                             channel_bounds, check_label_values, label_values, lossy_mask_foreground)

SUBSETS = ("all", "train", "val")
SPLIT_BY = ("patient", "case")
# Four decoded BraTS cases (4 channels int16 + label) take about 150 MB per worker.
DEFAULT_CACHE_VOLUMES = 4


def create_dataset(data_dir, *, dataset: str = "auto", preprocess: Preprocess | None = None,
                   subset: str = "all", augment: bool = False, val_fraction: float = 0.1,
                   split_by: str = "patient", split_seed: int = 0, mask_suffix: str = "_mask",
                   require_labels: bool = False, skip_empty_slices: bool | None = None,
                   cache_volumes: int = DEFAULT_CACHE_VOLUMES,
                   keep_original_label: bool = False) -> "SegmentationDataset":
    """Dataset of 2D items from ``data_dir`` in one of the layouts of ``data.layouts``.

    preprocess: the transform (None: defaults); its channel_names and dataset are filled from
        the data, and a non-empty channel_names (from a checkpoint) must match the data's count.
    subset: "all", or "train"/"val" of a split by ``split_by`` ("patient": slices of one
        patient never land on both sides; "case": per slice or volume) with ``val_fraction``
        of the groups in val, drawn with ``split_seed``.
    require_labels: DataError when a case has no mask (training); otherwise such items simply
        have no "label".
    skip_empty_slices: volume layouts only; drop slices without brain (all-zero first channel).
        None: True for "train" and "val", False for "all" (so that volumes reassemble).
    cache_volumes: decoded volumes kept per worker (LRU), so slicing does not re-read a case.
    keep_original_label: items also carry "original_label", the {0, 1} int64 mask ([H, W] or
        [K, H, W]) on the input's own grid (before crop/pad/resize), for evaluation at the input's size.
    """
    if subset not in SUBSETS:
        raise DataConfigError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if split_by not in SPLIT_BY:
        raise DataConfigError(f"unknown --split_by {split_by!r}; choose one of {', '.join(SPLIT_BY)}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataConfigError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    preprocess = Preprocess() if preprocess is None else preprocess
    # A folder no layout recognises may be new, unlabelled scans of the layout the model knows.
    found = scan(data_dir, dataset, mask_suffix=mask_suffix, trained_layout=preprocess.dataset,
                 channel_names=preprocess.channel_names)
    preprocess = _complete_label_channels(preprocess, found)
    records = split_records(found, subset, split_by=split_by, val_fraction=float(val_fraction),
                            split_seed=int(split_seed))
    if require_labels:
        for rec in records:
            if rec.label_file is None:
                raise DataError(f"no mask for {rec.image_files[0]} (training needs a mask for every image)")
    if skip_empty_slices is None:
        skip_empty_slices = subset != "all"
    if found.kind == "volume":
        return VolumeSliceDataset(found, records, preprocess=preprocess, augment=augment,
                                  keep_original_label=keep_original_label,
                                  skip_empty_slices=skip_empty_slices, cache_volumes=cache_volumes)
    return SliceDataset(found, records, preprocess=preprocess, augment=augment,
                        keep_original_label=keep_original_label)


def _several_labels_hint(preprocess: Preprocess, layout: str) -> str:
    """What a user of classes or regions needs to know of an image-folder layout, whose masks
    are read as one foreground (0/1 or 0/255); "" in the one-channel modes."""
    if preprocess.label_mode in SINGLE_CHANNEL_MODES:
        return ""
    return (f"; the {layout} layout reads binary masks: label maps of several values are read from the "
            "nnunet layout (dataset.json + imagesTr/labelsTr)")


def _complete_label_channels(preprocess: Preprocess, found: Scan) -> Preprocess:
    """Fill the multiclass classes from the dataset's declared labels (regions, and their
    ``regions_class_order``, from an nnU-Net dataset.json that declares them) when the flags left
    them empty, and refuse label values that the dataset does not declare."""
    declared = ", ".join(str(v) for v in found.declared_labels)
    if preprocess.label_mode == "multiclass" and not preprocess.classes:
        if found.notes.get("label_conflict"):
            raise DataConfigError(f"{found.root} holds {found.notes['label_conflict']}; give --classes "
                                  "(1,2,3,4 keeps enhancing tumour as two classes; --regions "
                                  "\"WT:1,2,3,4;TC:1,3,4;ET:3,4\" unites them)")
        classes = tuple(v for v in found.declared_labels if v != 0)
        if not classes:
            raise DataConfigError(f"{found.root} declares no foreground label; give --classes (e.g. 1,2,4)")
        preprocess = dataclasses.replace(preprocess, classes=classes)
    if preprocess.label_mode == "regions" and not preprocess.regions:
        regions = found.notes.get("regions")
        if not regions:
            raise DataConfigError(f"--label_mode regions needs --regions (e.g. \"WT:1,2,4;TC:1,4;ET:4\"); "
                                  f"{found.root} declares none (labels: {declared})")
        preprocess = dataclasses.replace(preprocess, regions=regions,
                                         regions_class_order=found.notes.get("regions_class_order", ()))
    wanted = preprocess.foreground_labels or preprocess.covered_labels
    # Unlabelled scans declare no labels of their own.
    missing = [] if found.notes.get("unlabelled") else [v for v in wanted if v not in found.declared_labels]
    if missing:
        hint = _several_labels_hint(preprocess, found.layout) if found.binary_masks else ""
        raise DataConfigError(f"{LABEL_FLAGS[preprocess.label_mode]} {missing[0]} is not a label of "
                              f"{found.root} (labels: {declared}){hint}")
    return preprocess


def split_records(found: Scan, subset: str, *, split_by: str, val_fraction: float, split_seed: int) -> list:
    """The records of ``subset``; groups (patients or cases) are shuffled with ``split_seed``."""
    records = found.records
    if subset == "all":
        return list(records)

    def group_of(rec):
        if split_by == "patient":
            return rec.patient_id
        return rec.volume_id if isinstance(rec, VolumeRecord) else rec.case_id

    groups = sorted({group_of(r) for r in records})
    n_val = int(round(val_fraction * len(groups)))
    if val_fraction > 0:
        if len(groups) < 2:
            raise DataError(f"{found.root} has a single {split_by} ({groups[0]}): it cannot be split into train "
                            f"and val; use --val_fraction 0 or more data")
        n_val = min(max(n_val, 1), len(groups) - 1)
    order = np.random.default_rng(split_seed).permutation(len(groups))
    val_groups = {groups[i] for i in order[:n_val]}
    chosen = [r for r in records if (group_of(r) in val_groups) == (subset == "val")]
    if not chosen:
        raise DataError(f"the {subset} subset of {found.root} is empty (--val_fraction {val_fraction})")
    return chosen


def collate(items: list) -> dict:
    """List of items -> {"image": [B, C, S, S], "label": [B, S, S] or [B, K, S, S] (if every item
    has one), "case_id": list[str], "meta": list[dict]}, plus "original_label": list of [H, W]
    (or [K, H, W]) tensors or None (sizes differ) when the items carry one."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "case_id": [it["case_id"] for it in items],
        "meta": [it["meta"] for it in items],
    }
    if items and all("label" in it for it in items):
        batch["label"] = torch.stack([it["label"] for it in items])
    if any("original_label" in it for it in items):
        batch["original_label"] = [it.get("original_label") for it in items]
    return batch


class SegmentationDataset(Dataset):
    """Common part of the layouts: preprocessing, augmentation and item assembly.

    Attributes: layout, root, num_channels, channel_names, preprocess (completed with the
    data's channel names and layout), declared_labels, labelled (every item has a mask),
    n_labelled (cases, or volumes, with a mask), unlabelled_input (the folder was recognised as
    unlabelled input of the model's layout, see ``data.layouts``).
    """

    def __init__(self, found: Scan, records: list, *, preprocess: Preprocess, augment: bool,
                 channel_names: tuple, keep_original_label: bool = False):
        self.layout = found.layout
        self.root = found.root
        self.kind = found.kind
        self.records = records
        self.declared_labels = tuple(found.declared_labels)
        self.binary_masks = found.binary_masks
        self.augment = bool(augment)
        self.channel_names = tuple(channel_names)
        self.num_channels = len(self.channel_names)
        self.labelled = all(r.label_file is not None for r in records)
        self.n_labelled = sum(r.label_file is not None for r in records)
        self.unlabelled_input = bool(found.notes.get("unlabelled"))
        self.keep_original_label = bool(keep_original_label)
        if preprocess.channel_names and len(preprocess.channel_names) != self.num_channels:
            raise DataError(f"{self.root} has {self.num_channels} channels ({', '.join(self.channel_names)}) but the "
                            f"preprocessing expects {len(preprocess.channel_names)} "
                            f"({', '.join(preprocess.channel_names)})")
        self.preprocess = preprocess.with_data(self.channel_names, self.layout)

    @property
    def case_ids(self) -> list:
        return [self._case_id(i) for i in range(len(self))]

    @property
    def item_format(self) -> str:
        """Every item's ``meta["format"]`` (``data.formats``), known without loading one."""
        return item_format(self.kind)

    @property
    def group_ids(self):
        """Per-item group (volume) for samplers that keep a volume's slices together; None here."""
        return None

    def _rng(self):
        if not self.augment:
            return None
        # torch's generator is seeded per DataLoader worker; numpy's global one is not.
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def _finish(self, image, label, bounds, case_id: str, meta: dict) -> dict:
        """Raw [C, H, W] image and ``map_label``'s {0,1} label ([H, W] or [K, H, W]) -> the item dict."""
        original = label
        image, label, plan = self.preprocess.apply(image, label, bounds, augment=self.augment, rng=self._rng())
        meta["geometry"] = plan
        item = {"image": torch.from_numpy(image), "case_id": case_id, "meta": meta}
        if label is not None:
            item["label"] = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
            if self.keep_original_label:
                item["original_label"] = torch.from_numpy(np.ascontiguousarray(original, dtype=np.int64))
        return item

    def _map_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Raw mask [H, W] -> ``Preprocess.map_label``'s target; undeclared values (and, with
        classes or regions, values none of them covers) are a DataError naming ``path``."""
        values = label_values(raw, path)
        if not self.binary_masks:
            check_label_values(values, self.declared_labels, path)
            self.preprocess.check_covered(values, path)
            return self.preprocess.map_label(as_int_label(raw))
        if mask_is_lossy(path) and raw.max() > 1:
            binary = as_int_label(lossy_mask_foreground(raw))
        else:
            binary = binary_mask_labels(raw, values)
        if binary is None:
            extra = sorted(set(values.tolist()) - {0, 1, 255})
            shown = ", ".join(str(v) for v in extra[:8]) + (", ..." if len(extra) > 8 else "")
            hint = _several_labels_hint(self.preprocess, self.layout)
            raise DataError(f"mask {path} has values {shown}; expected a binary mask with values 0/1 or 0/255{hint}")
        return self.preprocess.map_label(binary)


# The three planes of the LGG set's TIFFs (Buda et al. 2019), so that overlays show its FLAIR.
LGG_CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")


class SliceDataset(SegmentationDataset):
    """Items read from their own files: BraTS 2D slice folders and 2D image layouts."""

    def __init__(self, found: Scan, records: list, *, preprocess: Preprocess, augment: bool,
                 keep_original_label: bool = False):
        channel_names = found.channel_names
        if channel_names is None:
            # Grey or colour: the first image decides, every other image must agree.
            first = records[0].image_files[0]
            if read_image(first).shape[2] != 3:
                channel_names = ("gray",)
            else:
                channel_names = LGG_CHANNELS if found.layout == "lgg" else ("R", "G", "B")
        self._first_file = records[0].image_files[0]
        super().__init__(found, records, preprocess=preprocess, augment=augment, channel_names=channel_names,
                         keep_original_label=keep_original_label)
        check_geometry(records)

    def __len__(self) -> int:
        return len(self.records)

    def _case_id(self, i: int) -> str:
        return self.records[i].case_id

    def __getitem__(self, i: int) -> dict:
        rec: SliceRecord = self.records[i]
        if self.kind == NIFTI_SLICE:
            image, affine, spacing = self._read_nifti_channels(rec)
        else:
            image, affine, spacing = self._read_image_channels(rec), None, [1.0, 1.0]
        label = None
        if rec.label_file is not None:
            if self.kind == NIFTI_SLICE:
                raw, _ = read_nifti(rec.label_file)
                raw = _squeeze_2d(raw, rec.label_file)
            else:
                raw = read_image(rec.label_file, as_mask=True)
            if raw.shape != image.shape[1:]:
                raise DataError(f"mask {rec.label_file} has shape {tuple(raw.shape)} but image "
                                f"{rec.image_files[0]} has shape {tuple(image.shape[1:])}")
            label = self._map_label(raw, rec.label_file)
        bounds = channel_bounds(image, self.preprocess.clip_percentiles)
        meta = {
            "source_files": list(rec.image_files) + ([rec.label_file] if rec.label_file else []),
            "format": self.item_format,
            "layout": self.layout,
            "original_shape": [int(image.shape[1]), int(image.shape[2])],
            "spacing": spacing,
            "affine": affine,
            "reference_file": rec.image_files[0],
            "patient_id": rec.patient_id,
            "volume_id": rec.volume_id,
            "slice_index": rec.slice_index,
            "volume_shape": None,
            "slice_axis": None,
        }
        return self._finish(image, label, bounds, rec.case_id, meta)

    def _read_nifti_channels(self, rec: SliceRecord):
        channels, header0 = [], None
        for path in rec.image_files:
            data, header = read_nifti(path)
            data = _squeeze_2d(data, path)
            check_finite(data, path)
            if channels and data.shape != channels[0].shape:
                raise DataError(f"image {path} has shape {tuple(data.shape)} but {rec.image_files[0]} "
                                f"has shape {tuple(channels[0].shape)}")
            header0 = header0 or header
            channels.append(data.astype(np.float32, copy=False))
        spacing = [float(z) for z in (tuple(header0.zooms) + (1.0, 1.0))[:2]]
        return np.stack(channels), header0.affine, spacing

    def _read_image_channels(self, rec: SliceRecord) -> np.ndarray:
        parts = []
        for path in rec.image_files:
            arr = read_image(path)
            if parts and arr.shape[:2] != parts[0].shape[:2]:
                raise DataError(f"image {path} has shape {arr.shape[:2]} but {rec.image_files[0]} "
                                f"has shape {parts[0].shape[:2]}")
            parts.append(arr)
        image = np.concatenate(parts, axis=2).transpose(2, 0, 1).astype(np.float32)
        check_finite(image, rec.image_files[0])
        if image.shape[0] != self.num_channels:
            raise DataError(f"image {rec.image_files[0]} has {image.shape[0]} channel(s) but the dataset's images have "
                            f"{self.num_channels} (as {self._first_file})")
        return image


class VolumeSliceDataset(SegmentationDataset):
    """Axial slices of 3D volumes, cut on the fly from a per-worker LRU cache of decoded cases."""

    def __init__(self, found: Scan, records: list, *, preprocess: Preprocess, augment: bool,
                 skip_empty_slices: bool, cache_volumes: int = DEFAULT_CACHE_VOLUMES,
                 keep_original_label: bool = False):
        super().__init__(found, records, preprocess=preprocess, augment=augment, channel_names=found.channel_names,
                         keep_original_label=keep_original_label)
        self.cache_volumes = max(1, int(cache_volumes))
        self._cache = OrderedDict()
        if skip_empty_slices:
            keep = _brain_slices(records)
        else:
            keep = [range(rec.shape[rec.slice_axis]) for rec in records]
        self.items = [(v, int(k)) for v, ks in enumerate(keep) for k in ks]
        if not self.items:
            raise DataError(f"no slices with brain (non-zero voxels) in the volumes of {found.root}")

    def __getstate__(self):
        # Each DataLoader worker builds its own cache; never ship decoded volumes to it.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.items)

    @property
    def group_ids(self):
        return [v for v, _ in self.items]

    def _case_id(self, i: int) -> str:
        v, k = self.items[i]
        return f"{self.records[v].volume_id}_{k:03d}"

    def __getitem__(self, i: int) -> dict:
        v, k = self.items[i]
        rec: VolumeRecord = self.records[v]
        slices, label_slices, bounds = self._volume(v)
        axis = rec.slice_axis
        image = slices[k].astype(np.float32)
        label = None
        if label_slices is not None:
            label = self.preprocess.map_label(label_slices[k].astype(np.int64))
        plane = [a for a in range(3) if a != axis]
        meta = {
            "source_files": list(rec.image_files) + ([rec.label_file] if rec.label_file else []),
            "format": NIFTI_VOLUME_SLICE,
            "layout": self.layout,
            "original_shape": [int(image.shape[1]), int(image.shape[2])],
            "spacing": [float(rec.zooms[a]) for a in plane],
            "affine": [list(row) for row in rec.affine],
            "reference_file": rec.image_files[0],
            "patient_id": rec.patient_id,
            "volume_id": rec.volume_id,
            "slice_index": k,
            "volume_shape": [int(s) for s in rec.shape],
            "slice_axis": axis,
        }
        return self._finish(image, label, bounds, self._case_id(i), meta)

    def _volume(self, v: int):
        """Decoded case ``v``: (slices [D, C, A, B], label slices [D, A, B] of raw values or None,
        per-channel intensity bounds), D along ``slice_axis`` and (A, B) the other axes in order.
        Slice-major and C-contiguous, so an item is one contiguous block of the cache."""
        if v in self._cache:
            self._cache.move_to_end(v)
            return self._cache[v]
        rec: VolumeRecord = self.records[v]
        channels = []
        for path in rec.image_files:
            data, _ = read_nifti(path)
            data = data.reshape(rec.shape)
            check_finite(data, path)
            channels.append(data)
        bounds = channel_bounds(channels, self.preprocess.clip_percentiles)
        dtype = np.result_type(*channels)
        slices = np.empty((rec.shape[rec.slice_axis], len(channels)) + _plane_shape(rec), dtype=dtype)
        for c, data in enumerate(channels):
            slices[:, c] = np.moveaxis(data, rec.slice_axis, 0)
        del channels
        label = None
        if rec.label_file is not None:
            raw, _ = read_nifti(rec.label_file)
            raw = raw.reshape(rec.shape)
            values = label_values(raw, rec.label_file)
            check_label_values(values, self.declared_labels, rec.label_file)
            self.preprocess.check_covered(values, rec.label_file)
            label = np.ascontiguousarray(np.moveaxis(as_int_label(raw), rec.slice_axis, 0))
            label = label.astype(np.uint8 if max(self.declared_labels) < 256 else np.int32)
        entry = (slices, label, bounds)
        self._cache[v] = entry
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return entry


def check_geometry(records: list) -> None:
    """Every file of a 2D case has one plane shape (read from the headers, in threads), so a mask
    of another size than its image fails when the dataset is built, not after work was done."""
    def check(rec: SliceRecord):
        first = plane_shape(rec.image_files[0])
        for path in rec.image_files[1:]:
            if plane_shape(path) != first:
                raise DataError(f"image {path} has shape {plane_shape(path)} but {rec.image_files[0]} "
                                f"has shape {first}")
        if rec.label_file is not None and plane_shape(rec.label_file) != first:
            raise DataError(f"mask {rec.label_file} has shape {plane_shape(rec.label_file)} but image "
                            f"{rec.image_files[0]} has shape {first}")

    _threaded(check, records, "checking image and mask sizes")


def _threaded(fn, records: list, what: str) -> list:
    """``[fn(r) for r in records]`` on a few threads (file reads release the GIL), with a
    progress bar for long lists."""
    workers = max(1, min(8, os.cpu_count() or 1, len(records)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fn, records)
        if len(records) > 20:
            results = tqdm(results, total=len(records), desc=what, leave=False)
        return list(results)


def _brain_slices(records: list) -> list:
    """Per volume, the slice indices whose first channel has a non-zero voxel.

    Decodes one channel per case (threads: gzip releases the GIL), once, at construction.
    """
    def find(rec: VolumeRecord):
        data, _ = read_nifti(rec.image_files[0])
        data = data.reshape(rec.shape)
        other = tuple(a for a in range(3) if a != rec.slice_axis)
        return np.flatnonzero(np.any(data != 0, axis=other)).tolist()

    return _threaded(find, records, "finding brain slices")


def _plane_shape(rec: VolumeRecord) -> tuple:
    return tuple(n for a, n in enumerate(rec.shape) if a != rec.slice_axis)


def _squeeze_2d(data: np.ndarray, path: str) -> np.ndarray:
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 2:
        raise DataError(f"NIfTI file {path} has shape {tuple(data.shape)}; expected a 2D slice")
    return data
