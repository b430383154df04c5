"""The names of an item's ``meta["format"]``: how its input was stored, and so how its outputs
are written back (NIfTI with the source header, whole volumes, or PNG)."""

NIFTI_SLICE = "nifti_slice"  # a 2D NIfTI file per case
NIFTI_VOLUME_SLICE = "nifti_volume_slice"  # one slice of a 3D NIfTI volume
IMAGE = "image"  # a 2D image file (PNG, TIFF, BMP, JPEG)
NIFTI_FORMATS = (NIFTI_SLICE, NIFTI_VOLUME_SLICE)


def item_format(scan_kind: str) -> str:
    """The ``meta["format"]`` of the items of a dataset whose layout scan is of ``scan_kind``
    (``data.layouts.Scan.kind``: "nifti_slice", "image" or "volume")."""
    if scan_kind == "volume":
        return NIFTI_VOLUME_SLICE
    return NIFTI_SLICE if scan_kind == NIFTI_SLICE else IMAGE
