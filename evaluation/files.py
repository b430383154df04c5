"""Reading folders of mask files for ``python -m evaluation``.

A folder is read flat (no sub-folders, so e.g. ``overlays/`` beside the masks is ignored).
Each mask file is one case; its case id is the file name without the extension and without
an optional suffix (``BraTS_001_seg.nii.gz`` with suffix ``_seg`` -> ``BraTS_001``). With a
non-empty suffix only files whose name ends with it (before the extension) are cases.

Formats:

- NIfTI (``.nii``, ``.nii.gz``, via nibabel): 2D or 3D, trailing axes of length 1 dropped;
  voxel spacing from the header's zooms. Float data are rounded to the nearest integer.
- PNG, TIFF, BMP (via Pillow): 2D; a multi-page TIFF is a 3D volume (pages on axis 0). Each
  page is read as the data loaders read a mask (``data.io.mask_plane``: colour by its largest
  channel, a mask drawn in the alpha channel from there). Spacing unknown.
- JPEG: as PNG, but binarised at mid-grey (``data.preprocess.lossy_mask_foreground``), since
  lossy compression scatters small nonzero values along the edges of a 0/255 mask.

Values are label values: 0 is background, any nonzero value foreground (so 0/1 and 0/255
masks both work), and ``--classes`` selects single values.
"""

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from PIL import Image

from data.io import mask_plane
from data.layouts import axial_axis
from data.preprocess import lossy_mask_foreground
from evaluation.errors import EvaluationError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
MASK_EXTENSIONS = NIFTI_EXTENSIONS + IMAGE_EXTENSIONS


def split_extension(name: str) -> tuple[str, str] | None:
    """(stem, extension) of a supported mask file name (case-insensitive), else None."""
    lower = name.lower()
    for ext in MASK_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return None


def find_cases(folder, suffix: str = "") -> dict[str, Path]:
    """Map case id -> mask file for the supported files directly inside ``folder``.

    Raises EvaluationError if two files give the same case id (e.g. ``a.nii.gz`` and
    ``a.png``).
    """
    cases: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        split = split_extension(path.name)
        if split is None:
            continue
        stem = split[0]
        if suffix:
            if not stem.endswith(suffix) or stem == suffix:
                continue
            stem = stem[: -len(suffix)]
        if stem in cases:
            raise EvaluationError(
                f"{cases[stem]} and {path} both give case id {stem!r}; keep one of them"
            )
        cases[stem] = path
    return cases


def _squeeze_trailing(arr: np.ndarray) -> np.ndarray:
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _as_labels(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return np.rint(np.nan_to_num(arr)).astype(np.int64)
    return arr


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = nib.load(str(path))
    data = _squeeze_trailing(np.asanyarray(img.dataobj))
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return data, zooms


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        frames = []
        for index in range(getattr(img, "n_frames", 1)):
            img.seek(index)
            img.load()
            frames.append(mask_plane(img, path))
    data = frames[0] if len(frames) == 1 else np.stack(frames)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        data = lossy_mask_foreground(data)
    return data


def read_mask(path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Read one mask file.

    Returns:
        (labels [H, W] or [D, H, W] integer array, spacing per axis in mm or None when the
        format does not record it).
    """
    path = Path(path)
    split = split_extension(path.name)
    if split is None:
        raise EvaluationError(
            f"{path}: unsupported mask format (use one of {', '.join(MASK_EXTENSIONS)})"
        )
    try:
        if split[1].lower() in NIFTI_EXTENSIONS:
            data, spacing = _read_nifti(path)
        else:
            data, spacing = _read_image(path), None
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as err:
        raise EvaluationError(f"{path}: cannot read the mask ({err})") from err
    if data.ndim not in (2, 3):
        raise EvaluationError(f"{path}: expected a 2D or 3D mask, got shape {data.shape}")
    return _as_labels(np.asarray(data)), spacing


def slice_axis(path) -> int:
    """The axis along which a 3D mask file is cut into the slices sample.py scores: for NIfTI the
    axial one (from the header's affine, as the volume layouts slice), else the first (the pages
    of a multi-page TIFF)."""
    path = Path(path)
    if path.name.lower().endswith(NIFTI_EXTENSIONS):
        return axial_axis(nib.load(str(path)).affine)
    return 0
