"""Precomputed pre-segmentations: masks made by any other tool, one file per case.

``sample.py --preseg_dir`` (and ``train_addpm.py --preseg_dir``) read them instead of running
a pre-segmentation net. The folder holds one file per case, named by the case id that the
dataset reports (``item["case_id"]``):

- ``<case_id>.nii.gz`` or ``<case_id>.nii`` when the input images are NIfTI slices;
- ``<volume_id>.nii.gz`` or ``<volume_id>.nii``, one whole volume, when the inputs are 3D
  volumes (BraTS volumes, nnU-Net 3D): the same names sample.py gives its volume outputs;
- ``<case_id>.png`` otherwise.

The file holds the mask at the input's own size (``meta["original_shape"]``, or the volume's
shape), as one of:
a binary mask in {0, 1} or {0, 255}; probabilities in [0, 1] (a float NIfTI, or an 8-/16-bit
PNG scaled by 255 / 65535); or, for NIfTI only, an integer label map (e.g. an nnU-Net
output), mapped to the foreground by the model's own label mapping (``Preprocess.map_label``:
every non-zero label, or only ``--foreground_labels``).

With several classes or regions (``--label_mode multiclass`` / ``regions``) the file is an
integer label map in the dataset's own values (NIfTI or PNG, e.g. BraTS 0, 1, 2, 4), mapped by
``Preprocess.map_label`` to one channel per class or region; a value that no class or region
covers is an error naming the file.
"""

import functools
import os

import numpy as np
import torch

from data.errors import DataError
from data.formats import NIFTI_FORMATS, NIFTI_VOLUME_SLICE
from data.io import read_image, read_nifti
from data.preprocess import SINGLE_CHANNEL_MODES, apply_geometry, binary_mask_labels, label_values


class PrecomputedMasks:
    """``masks(batch)`` -> the batch's precomputed pre-segmentations as per-channel
    probabilities [B, K, S, S] (CPU float32; K = 1 for binary and subset), each case's file
    mapped through the case's own geometry (``meta["geometry"]``, augmentation included) onto
    the grid the networks see.

    ``preprocess`` (the run's ``Preprocess``, its classes filled in) maps label-map files; None
    counts every non-zero label as foreground.
    """

    def __init__(self, preseg_dir, preprocess=None):
        self.preseg_dir = preseg_dir
        self.preprocess = preprocess

    def __call__(self, batch):
        by_channel = self.preprocess is not None and self.preprocess.label_mode not in SINGLE_CHANNEL_MODES
        masks = []
        for case_id, meta in zip(batch["case_id"], batch["meta"]):
            if by_channel:
                mask = read_precomputed_label_channels(self.preseg_dir, case_id, meta, self.preprocess)
            else:
                map_label = self.preprocess.map_label if self.preprocess is not None else None
                mask = read_precomputed_preseg(self.preseg_dir, case_id, meta, map_label=map_label)[None]
            # The file is at the input's own size; the networks see the preprocessed grid.
            masks.append(torch.from_numpy(apply_geometry(mask, meta["geometry"], order=1)))
        return torch.stack(masks)


def _to_probability(array, path, *, png_scale, map_label=None):
    """Mask values -> float32 foreground probabilities (the conventions of the module docstring).

    map_label: raw label map -> {0, 1} foreground, for NIfTI label maps (None: non-zero)."""
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise DataError(f"{path}: holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if 0.0 <= low and high <= 1.0:
            return array.astype(np.float32)
        if not np.array_equal(array, np.round(array)):
            raise DataError(
                f"{path}: float values in [{low:g}, {high:g}]; probabilities must lie in [0, 1]"
            )
    values = np.unique(array)
    if values.min() < 0:
        raise DataError(f"{path}: negative value {values.min():g} in a mask")
    binary = binary_mask_labels(array, values)
    if binary is not None:
        return binary.astype(np.float32)
    if png_scale is not None:
        return np.clip(array.astype(np.float32) / png_scale, 0.0, 1.0)
    # A NIfTI with other integer labels is a label map from another tool (e.g. nnU-Net).
    if map_label is not None:
        return np.asarray(map_label(array.astype(np.int64)), dtype=np.float32)
    return (array > 0).astype(np.float32)


def precomputed_preseg_path(preseg_dir, case_id, meta):
    """The file of ``case_id`` in ``preseg_dir`` (layout in the module docstring).

    :raises DataError: when there is none.
    """
    if meta.get("format") == NIFTI_VOLUME_SLICE:
        # Slices of a 3D input: one volume per case, as nnU-Net and other 3D tools write them.
        names = [f"{meta['volume_id']}.nii.gz", f"{meta['volume_id']}.nii"]
    elif meta.get("format") in NIFTI_FORMATS:
        names = [f"{case_id}.nii.gz", f"{case_id}.nii"]
    else:
        names = [f"{case_id}.png"]
    for name in names:
        path = os.path.join(preseg_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"--preseg_dir {preseg_dir}: no pre-segmentation for case {case_id!r} "
        f"(expected {' or '.join(names)})"
    )


@functools.lru_cache(maxsize=2)
def _read_volume(path):
    """One decoded pre-segmentation volume, kept while its slices are read one after another."""
    array, _ = read_nifti(path)
    return array


def check_label_map_file(path, preprocess):
    """DataError naming ``path`` unless it holds integer labels that the run's classes or
    regions cover: the check ``sample.py`` makes of every file before it samples a case."""
    array = read_image(path, as_mask=True) if path.endswith(".png") else _read_volume(path)
    _check_label_map(np.asarray(array), path, preprocess)


def _check_label_map(array, path, preprocess):
    values = label_values(array, path)
    if values.size and values.min() < 0:
        raise DataError(f"{path}: negative value {values.min()} in a label map")
    preprocess.check_covered(values, path)


def read_precomputed_label_channels(preseg_dir, case_id, meta, preprocess):
    """The precomputed pre-segmentation of one case as the run's channels: float32 {0, 1}
    [K, H, W] at the input's own size, from an integer label map in the dataset's values
    (``preprocess.map_label``, multiclass or regions mode).

    :raises DataError: what ``read_precomputed_preseg`` raises, non-integer values, or a value
        that no class or region covers.
    """
    path, array = _read_case_array(preseg_dir, case_id, meta)
    _check_label_map(array, path, preprocess)
    return preprocess.map_label(np.rint(array).astype(np.int64)).astype(np.float32)


def read_precomputed_preseg(preseg_dir, case_id, meta, map_label=None):
    """Read the precomputed pre-segmentation of one case (layout in the module docstring).

    :param preseg_dir: folder holding one file per case.
    :param case_id: the dataset's case id (``item["case_id"]``).
    :param meta: the dataset item's ``meta`` (``format``, ``original_shape``).
    :param map_label: the model's label mapping (``Preprocess.map_label``) for label maps;
        None counts every non-zero label.
    :return: float32 array ``[H, W]`` of foreground probabilities in [0, 1] at the input
        image's own size, in the file's array order (as the data readers load the input).
    :raises DataError: a missing or unreadable file, values that are not a mask or
        probabilities, or a shape that differs from the input's.
    """
    path, array = _read_case_array(preseg_dir, case_id, meta)
    if path.endswith(".png"):
        # 8-bit PNGs read as uint8; 16-bit ones as float32 holding 0..65535.
        png_scale = 255.0 if array.dtype == np.uint8 else 65535.0
    else:
        png_scale = None
    return _to_probability(array, path, png_scale=png_scale, map_label=map_label)


def _read_case_array(preseg_dir, case_id, meta):
    """(path, the case's array [H, W] as stored) of one case's file, its shape checked."""
    path = precomputed_preseg_path(preseg_dir, case_id, meta)
    if path.endswith(".png"):
        array = read_image(path, as_mask=True)
    elif meta.get("format") == NIFTI_VOLUME_SLICE:
        volume = _read_volume(path)
        if tuple(volume.shape) != tuple(meta["volume_shape"]):
            raise DataError(
                f"{path}: shape {tuple(volume.shape)} differs from the input volume's {tuple(meta['volume_shape'])}"
            )
        array = np.take(volume, int(meta["slice_index"]), axis=int(meta["slice_axis"]))
    else:
        array, _ = read_nifti(path)
        # A 2D mask saved as a one-slice volume (H, W, 1) is common for NIfTI slices.
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
    expected = tuple(int(s) for s in meta["original_shape"])
    if tuple(array.shape) != expected:
        raise DataError(
            f"{path}: shape {tuple(array.shape)} differs from the input image's {expected}"
        )
    return path, np.asarray(array)
