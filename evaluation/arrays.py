"""Array conversions shared by the evaluation modules."""

import numpy as np


def to_numpy(x) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor on any device, or nested sequence) as numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_bool_mask(x) -> np.ndarray:
    """Return ``x`` as a boolean numpy array; any nonzero value is foreground."""
    arr = to_numpy(x)
    return arr if arr.dtype == bool else arr != 0
