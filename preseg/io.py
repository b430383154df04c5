"""Network flags, checkpoint loading and precomputed pre-segmentations.

The pre-segmentation and the denoising trainers describe their network with the same five
flags (``--arch --arch_kwargs --base_channels --depth --dropout``); this module turns those
flags into the checkpoint's ``config`` and a ``config`` back into a network, so that
``sample.py`` rebuilds either net from its checkpoint alone.

Precomputed pre-segmentations (masks made by any other tool, given to ``sample.py`` instead of
a pre-segmentation checkpoint) live in one folder, one file per case, named by the case id
that the dataset reports (``item["case_id"]``):

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
"""

import functools
import json
import os

import numpy as np
import torch

from data.errors import DataError
from data.io import read_image, read_nifti
from data.preprocess import Preprocess, apply_geometry
from guided_diffusion.checkpoint import load_checkpoint, load_weights
from guided_diffusion.errors import CheckpointError, ConfigError
from preseg.networks import build_network, foreground_probability, registry_help

NUM_CLASSES = 2

# Keys of a checkpoint config that describe the network (kind "preseg" and "denoiser").
NETWORK_KEYS = ("arch", "arch_kwargs", "base_channels", "depth", "dropout", "in_channels",
                "num_classes")


def network_defaults():
    """Flags that choose and size the network, shared by both supervised trainers."""
    return dict(arch="unet", arch_kwargs="", base_channels=32, depth=4, dropout=0.0)


NETWORK_HELP = {
    "arch": registry_help(),
    "arch_kwargs": (
        "extra constructor arguments for --arch as a JSON object, e.g. '{\"norm\": \"group\"}' "
        "(empty: none)"
    ),
    "base_channels": "U-Nets: channels at full resolution, doubled at each level down",
    "depth": "U-Nets: number of 2x2 poolings (levels below full resolution); any image size works",
    "dropout": "U-Nets: channel-dropout probability inside the convolution blocks (0 = off)",
}


def parse_arch_kwargs(text):
    """Parse ``--arch_kwargs`` (a JSON object, or empty) into a dict; ConfigError otherwise."""
    if isinstance(text, dict):
        return dict(text)
    if text is None or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--arch_kwargs: not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--arch_kwargs: expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def network_config(args, *, in_channels, num_classes=NUM_CLASSES):
    """The network part of a checkpoint config, from parsed flags.

    :param args: namespace (or dict) with the keys of :func:`network_defaults`.
    :param in_channels: channels of the network's input (derived from the data).
    :return: dict with the keys ``NETWORK_KEYS``, plain Python types only.
    """
    get = args.get if isinstance(args, dict) else lambda key: getattr(args, key)
    return {
        "arch": str(get("arch")),
        "arch_kwargs": parse_arch_kwargs(get("arch_kwargs")),
        "base_channels": int(get("base_channels")),
        "depth": int(get("depth")),
        "dropout": float(get("dropout")),
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
    }


def build_network_from_config(config):
    """Build the (untrained) network a checkpoint config describes."""
    return build_network(
        config["arch"],
        in_channels=config["in_channels"],
        num_classes=config["num_classes"],
        base_channels=config["base_channels"],
        depth=config["depth"],
        dropout=config["dropout"],
        arch_kwargs=config.get("arch_kwargs") or None,
    )


def load_network_checkpoint(path, kind, device="cpu"):
    """Load a supervised network checkpoint of ``kind`` ("preseg" or "denoiser").

    :return: ``(model, config)``, the network in eval mode on ``device``.
    :raises CheckpointError: missing, foreign or wrong-kind file, a config without the
        network keys, or weights that do not fit.
    """
    ckpt = load_checkpoint(path, kind=kind, map_location="cpu")
    config = ckpt["config"]
    missing = [key for key in NETWORK_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{path}: {kind} checkpoint config lacks {', '.join(missing)}")
    model = build_network_from_config(config)
    load_weights(model, ckpt["model"], source=str(path))
    model.to(device)
    model.eval()
    return model, config


def load_preseg(path, device="cpu"):
    """Load a pre-segmentation checkpoint written by ``train_preseg_network.py``.

    :return: ``(model, config)``: the network in eval mode on ``device`` (``forward(x
        [B,C,H,W]) -> logits [B,2,H,W]``) and its config (network keys, ``preprocess``,
        ``args``).
    :raises CheckpointError: missing, foreign or wrong-kind file, or weights that do not fit.
    """
    return load_network_checkpoint(path, "preseg", device)


class PresegSource:
    """Where the pre-segmentation of a batch comes from: a trained net or a folder of masks.

    ``source(batch)`` returns foreground probabilities [B, 1, S, S] on the network grid, on
    ``device``: the net's softmax on ``batch["image"]``, or each case's precomputed file
    (``read_precomputed_preseg``, label maps mapped by ``preprocess.map_label``) mapped through
    the case's own geometry (``meta["geometry"]``, augmentation included) onto the grid the
    networks see. ``preprocess`` is the run's ``Preprocess``.
    """

    def __init__(self, *, net=None, preseg_dir="", preprocess=None, device="cpu"):
        if (net is None) == (not preseg_dir):
            raise ConfigError("give --preseg_path or --preseg_dir, not both")
        self.net = net
        self.preseg_dir = preseg_dir
        self.preprocess = preprocess
        self.device = torch.device(device)

    @classmethod
    def from_flags(cls, *, preseg_path="", preseg_dir="", preprocess=None, device="cpu"):
        """Load ``--preseg_path`` (checked against ``preprocess``, the diffusion model's; without
        one, the net's own preprocessing is the run's) or take ``--preseg_dir`` (with
        ``preprocess``, whose labels map label-map files); one of the two must be given."""
        if preseg_path and preseg_dir:
            raise ConfigError("give --preseg_path or --preseg_dir, not both")
        if preseg_dir:
            if not os.path.isdir(preseg_dir):
                raise ConfigError(f"--preseg_dir {preseg_dir}: no such folder")
            return cls(preseg_dir=preseg_dir, preprocess=preprocess, device=device)
        if not preseg_path:
            raise ConfigError("a pre-segmentation is needed: give --preseg_path or --preseg_dir")
        net, config = load_preseg(preseg_path, device)
        if preprocess is not None:
            preprocess.check_same_as(config["preprocess"], preseg_path)
        else:
            preprocess = Preprocess.from_dict(config["preprocess"])
        return cls(net=net, preprocess=preprocess, device=device)

    def __call__(self, batch):
        if self.net is not None:
            return foreground_probability(self.net(batch["image"].to(self.device)))
        map_label = self.preprocess.map_label if self.preprocess is not None else None
        masks = []
        for case_id, meta in zip(batch["case_id"], batch["meta"]):
            mask = read_precomputed_preseg(self.preseg_dir, case_id, meta, map_label=map_label)
            # The file is at the input's own size; the networks see the preprocessed grid.
            masks.append(torch.from_numpy(apply_geometry(mask, meta["geometry"], order=1)))
        return torch.stack(masks).unsqueeze(1).to(self.device)


def _is_nifti_input(meta):
    return str(meta.get("format", "")).startswith("nifti")


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
    if np.all(np.isin(values, (0, 1))):
        return array.astype(np.float32)
    if np.all(np.isin(values, (0, 255))):
        return (array > 0).astype(np.float32)
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
    if meta.get("format") == "nifti_volume_slice":
        # Slices of a 3D input: one volume per case, as nnU-Net and other 3D tools write them.
        names = [f"{meta['volume_id']}.nii.gz", f"{meta['volume_id']}.nii"]
    elif _is_nifti_input(meta):
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
    path = precomputed_preseg_path(preseg_dir, case_id, meta)
    if path.endswith(".png"):
        array = read_image(path, as_mask=True)
        # 8-bit PNGs read as uint8; 16-bit ones as float32 holding 0..65535.
        png_scale = 255.0 if array.dtype == np.uint8 else 65535.0
    elif meta.get("format") == "nifti_volume_slice":
        volume = _read_volume(path)
        if tuple(volume.shape) != tuple(meta["volume_shape"]):
            raise DataError(
                f"{path}: shape {tuple(volume.shape)} differs from the input volume's {tuple(meta['volume_shape'])}"
            )
        array = np.take(volume, int(meta["slice_index"]), axis=int(meta["slice_axis"]))
        png_scale = None
    else:
        array, _ = read_nifti(path)
        png_scale = None
        # A 2D mask saved as a one-slice volume (H, W, 1) is common for NIfTI slices.
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
    expected = tuple(int(s) for s in meta["original_shape"])
    if tuple(array.shape) != expected:
        raise DataError(
            f"{path}: shape {tuple(array.shape)} differs from the input image's {expected}"
        )
    return _to_probability(np.asarray(array), path, png_scale=png_scale, map_label=map_label)


def args_record(args):
    """All parsed flags as plain Python values, stored in a checkpoint for the record."""
    return {
        key: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in sorted(vars(args).items())
    }
