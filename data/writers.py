"""Write network outputs back in the input's own format and geometry.

A case read from NIfTI is written as NIfTI with the source file's affine and header (same
array shape as the source slice); slices of a 3D volume are reassembled into a volume with the
volume's affine and header; a case read from an image file is written as PNG: masks as 8-bit
0/255, label maps of several classes with their own values (8-bit, 16-bit above 255), float
maps in [0, 1] as 16-bit (0..65535). Every file is written to a temporary name
in its folder and then renamed, so an interrupted run never leaves half a file.
A PNG holds 16 bits at most: label values above 65535 are refused (``check_label_map_values``)
rather than wrapped.
"""

import nibabel as nib
import numpy as np
from PIL import Image

from data.errors import DataError
from data.formats import NIFTI_FORMATS
from guided_diffusion.atomic import atomic_write


# The largest label value a (16-bit) PNG label map holds.
PNG_MAX_LABEL = 65535


def output_extension(meta: dict) -> str:
    """File ending of the outputs of a case: .nii.gz for NIfTI inputs, .png otherwise."""
    return ".nii.gz" if meta["format"] in NIFTI_FORMATS else ".png"


def check_label_map_values(largest: int, item_format: str, what: str) -> None:
    """DataError naming ``what`` when the label maps written for inputs of ``item_format``
    cannot hold the label value ``largest``: image inputs get PNG label maps, 16 bits at most."""
    if item_format not in NIFTI_FORMATS and largest > PNG_MAX_LABEL:
        raise DataError(f"{what}: label value {largest} does not fit the 16-bit PNG label maps that image "
                        f"inputs get (at most {PNG_MAX_LABEL})")


def _load_reference(path: str):
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise DataError(f"{path}: cannot read the reference NIfTI header ({exc})") from None


def _nifti_like(array: np.ndarray, reference, path: str) -> str:
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, reference.affine, header)
    return atomic_write(path, lambda tmp: nib.save(image, tmp))


def write_slice(path_stem: str, array: np.ndarray, meta: dict, *, label_map: bool = False) -> str:
    """Write one 2D map [H, W] (at the input's geometry) beside ``path_stem`` + extension.

    Boolean / integer arrays are masks; float arrays are maps with values in [0, 1].
    ``label_map``: an integer map in the dataset's label values (several classes), written
    with those values (NIfTI in the array's own integer type). Returns the path written.
    """
    path = path_stem + output_extension(meta)
    array = np.asarray(array)
    is_mask = array.dtype == bool or np.issubdtype(array.dtype, np.integer)
    if meta["format"] in NIFTI_FORMATS:
        reference = _load_reference(meta["reference_file"])
        data = array if label_map else array.astype(np.uint8 if is_mask else np.float32)
        data = data.reshape(reference.shape) if int(np.prod(reference.shape)) == data.size else data
        return _nifti_like(data, reference, path)
    if label_map:
        largest = int(array.max(initial=0))
        check_label_map_values(largest, meta["format"], f"label map {path}")
        image = Image.fromarray(array.astype(np.uint8 if largest < 256 else np.uint16))
    elif is_mask:
        image = Image.fromarray((array > 0).astype(np.uint8) * 255)
    else:
        image = Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 65535).astype(np.uint16))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_volume(path: str, slices: dict, meta: dict, dtype) -> str:
    """Reassemble {slice_index: [H, W]} along the volume's slice axis and write it as NIfTI.

    Slices that are absent (not sampled) are written as 0.
    """
    reference = _load_reference(meta["reference_file"])
    shape = tuple(meta["volume_shape"])
    axis = int(meta["slice_axis"])
    volume = np.zeros(shape, dtype=dtype)
    for index, plane in slices.items():
        target = [slice(None)] * 3
        target[axis] = int(index)
        volume[tuple(target)] = plane
    return _nifti_like(volume, reference, path)
