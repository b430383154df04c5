"""File readers: NIfTI and 2D image files, with every failure turned into a one-line DataError.

All readers return numpy arrays in the array order of the file (no transposes), so that a
prediction written back with the same header lines up with the input voxel for voxel.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from data.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Lossy formats cannot store exact label values: their masks are thresholded at mid-grey.
LOSSY_SUFFIXES = (".jpg", ".jpeg")

# Images larger than this are refused by PIL as possible decompression bombs; medical
# slides can legitimately be large, so the limit is raised, not removed.
Image.MAX_IMAGE_PIXELS = 1 << 30


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image/NIfTI extension (``a.nii.gz`` -> ``a``)."""
    low = name.lower()
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


@dataclass
class NiftiHeader:
    """What the index needs from a NIfTI header without decoding the voxels."""

    shape: tuple
    affine: list  # 4x4 nested list of floats
    zooms: tuple


def read_nifti_header(path: str) -> NiftiHeader:
    """Header of ``path`` (reads only the first bytes of a .nii.gz)."""
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise DataError(f"cannot read NIfTI file {path}: corrupt or not NIfTI ({_reason(exc, path)})") from None
    return NiftiHeader(shape=shape, affine=affine.tolist(), zooms=zooms)


def plane_shape(path: str) -> tuple:
    """(H, W) of a 2D NIfTI slice or image file, from its header alone (no voxels decoded).

    Trailing NIfTI axes of length 1 are dropped, as the slice loaders do; a file that is not
    2D is a DataError."""
    if is_nifti(path):
        shape = list(read_nifti_header(path).shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape.pop()
        if len(shape) != 2:
            raise DataError(f"NIfTI file {path} has shape {tuple(shape)}; expected a 2D slice")
        return tuple(shape)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image file or an unsupported format") from None
    except Exception as exc:
        raise DataError(f"cannot read image {path}: corrupt or unsupported ({_reason(exc, path)})") from None
    return (int(height), int(width))


_SIZEOF_HDR_LE = (348).to_bytes(4, "little")
_SIZEOF_HDR_BE = (348).to_bytes(4, "big")


def read_nifti(path: str) -> tuple[np.ndarray, NiftiHeader]:
    """Voxels of ``path`` (scaled by the header's slope/intercept) and its header.

    Integer data keeps its dtype (a cached BraTS volume stays int16); float data becomes float32.
    """
    try:
        data, header = _read_nifti1_direct(path)
    except Exception:  # anything unusual: nibabel's full loader reads it or says what is wrong
        data, header = _read_nifti_nibabel(path)
    return _checked_dtype(np.asarray(data), path), header


def _read_nifti1_direct(path: str):
    """Single-file NIfTI-1 without nibabel's per-file header checks, about 3x faster for the
    small files of 2D slice folders. Raises on anything but a plain, valid .nii/.nii.gz."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:4] not in (_SIZEOF_HDR_LE, _SIZEOF_HDR_BE) or raw[344:348] != b"n+1\x00":
        raise ValueError("not a single-file NIfTI-1")
    buf = io.BytesIO(raw)
    hdr = nib.Nifti1Header.from_fileobj(buf, check=False)
    shape = tuple(int(s) for s in hdr.get_data_shape())
    data = hdr.data_from_fileobj(buf)
    affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    zooms = tuple(float(z) for z in hdr.get_zooms()[: len(shape)])
    if data.shape != shape or not np.isfinite(affine).all():
        raise ValueError("inconsistent header")
    return data, NiftiHeader(shape=shape, affine=affine.tolist(), zooms=zooms)


def _read_nifti_nibabel(path: str):
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    except Exception as exc:
        raise DataError(f"cannot read NIfTI file {path}: corrupt or not NIfTI ({_reason(exc, path)})") from None
    return data, NiftiHeader(shape=shape, affine=affine.tolist(), zooms=zooms)


def _checked_dtype(data: np.ndarray, path: str) -> np.ndarray:
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    elif data.dtype.kind not in "fiub":
        raise DataError(f"NIfTI file {path} has unsupported voxel type {data.dtype}")
    return data


def read_image(path: str, *, as_mask: bool = False) -> np.ndarray:
    """A 2D image file as ``[H, W, C]`` (C = 1 grey, 3 colour) or, with ``as_mask``, ``[H, W]``
    (``mask_plane``).

    Alpha channels of images are dropped (they carry no intensity).
    """
    try:
        with Image.open(path) as img:
            img.load()
            if as_mask:
                return mask_plane(img, path)
            arr = _pil_to_array(img)
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image file or an unsupported format") from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image {path}: corrupt or unsupported ({_reason(exc, path)})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {path} has unsupported shape {tuple(arr.shape)}")
    return arr


_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "PA": "RGBA", "LA": "LA", "La": "LA"}


def mask_plane(img: Image.Image, path) -> np.ndarray:
    """One mask plane ``[H, W]`` of a (loaded) PIL image frame; every mask reader uses it.

    Colour masks become one channel by their per-pixel maximum, so a white-on-black RGB mask
    reads as the grey one it depicts. A mask drawn in the alpha channel (the colour the same
    everywhere, e.g. white with the mask as opacity) reads from the alpha channel; an opaque
    alpha is ignored. Colour and alpha that both vary and disagree on what is foreground are
    refused (DataError naming the file): no reading of such a file would be safe.
    """
    mode = img.mode
    if mode == "P":
        mode = "PA" if "transparency" in img.info else "RGB"
    if mode in _ALPHA_MODES:
        arr = np.asarray(img.convert(_ALPHA_MODES[mode]))
        if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise DataError(f"image {path} has unsupported shape {tuple(arr.shape)}")
        return _colour_or_alpha(arr[..., :-1].max(axis=-1), arr[..., -1], path)
    arr = _pil_to_array(img if img.mode == mode else img.convert(mode))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image {path} has unsupported shape {tuple(arr.shape)}")
    return arr


def _colour_or_alpha(colour: np.ndarray, alpha: np.ndarray, path) -> np.ndarray:
    if alpha.min() == alpha.max():
        return colour  # opaque (or uniformly translucent): the mask is in the colour
    if colour.min() == colour.max():
        return alpha  # one colour everywhere: the mask is in the alpha channel
    if np.array_equal(colour > 0, alpha > 0):
        return colour
    raise DataError(f"mask {path} has a colour mask and a different mask in its alpha channel; "
                    "save the mask in one of them")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGB", "L"):
        return np.asarray(img)
    if mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return np.asarray(img.convert("RGB"))
    if mode in ("LA", "La", "1"):
        return np.asarray(img.convert("L"))
    # 16-bit and float grey (I;16, I, F): keep the full range.
    return np.asarray(img).astype(np.float32)


def check_finite(array: np.ndarray, path: str) -> None:
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            count = int(bad.sum())
            raise DataError(f"{path} contains NaN or inf values ({count} voxel{'s' if count > 1 else ''})")


def _reason(exc: BaseException, path: str) -> str:
    # Library messages often repeat the path, which the caller's message already names.
    text = " ".join(str(exc).replace(f'"{path}"', "").replace(f"'{path}'", "").replace(str(path), "").split())
    text = re.sub(r"\s+(of|in|for|from)$", "", text)
    if not text:
        return type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
