"""The supervised nets' flags and checkpoints: flags -> config -> network.

The pre-segmentation and the denoising trainers describe their network with the same five
flags (``--arch --arch_kwargs --base_channels --depth --dropout``); this module turns those
flags into the checkpoint's ``config`` and a ``config`` back into a network, so that
``sample.py`` rebuilds either net from its checkpoint alone. (Precomputed pre-segmentations
are read by ``data.precomputed``; ``preseg.source`` chooses between the two.)
"""

import json

from data import Preprocess
from guided_diffusion.checkpoint import load_checkpoint, load_weights
from guided_diffusion.errors import CheckpointError, ConfigError
from preseg.networks import build_network, registry_help

# Outputs of a net for one foreground (background and foreground); with --classes or
# --regions the trainers take Preprocess.network_classes instead.
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
    check_outputs_fit_labels(config, path)
    model = build_network_from_config(config)
    load_weights(model, ckpt["model"], source=str(path))
    model.to(device)
    model.eval()
    return model, config


def check_outputs_fit_labels(config, path):
    """CheckpointError when a net's outputs do not fit the label mode its config records (a
    config without a ``preprocess`` record is not checked)."""
    record = config.get("preprocess")
    if not record:
        return
    preprocess = Preprocess.from_dict(record)
    if int(config["num_classes"]) != preprocess.network_classes:
        raise CheckpointError(
            f"{path}: the net has {config['num_classes']} outputs, its label mode "
            f"{preprocess.label_mode} ({preprocess.describe_labels() or 'one foreground'}) needs "
            f"{preprocess.network_classes}"
        )


def load_preseg(path, device="cpu"):
    """Load a pre-segmentation checkpoint written by ``train_preseg_network.py``.

    :return: ``(model, config)``: the network in eval mode on ``device`` (``forward(x
        [B,C,H,W]) -> logits [B,num_classes,H,W]``: 2 for one foreground, K + 1 for classes,
        K for regions) and its config (network keys, ``preprocess``,
        ``args``).
    :raises CheckpointError: missing, foreign or wrong-kind file, or weights that do not fit.
    """
    return load_network_checkpoint(path, "preseg", device)


def args_record(args):
    """All parsed flags as plain Python values, stored in a checkpoint for the record."""
    return {
        key: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in sorted(vars(args).items())
    }
