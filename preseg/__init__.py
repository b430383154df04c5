"""Pre-segmentation networks (a registry by name, plus any importable nn.Module) and their loss."""

from preseg.losses import RegionLoss, SegmentationLoss, channel_dice, dice_per_image, make_loss, soft_dice_score
from preseg.networks import ARCH_CHOICES, DEFAULT_ARCH, build_network, mask_probabilities, registry_help

__all__ = [
    "ARCH_CHOICES",
    "DEFAULT_ARCH",
    "RegionLoss",
    "SegmentationLoss",
    "build_network",
    "channel_dice",
    "dice_per_image",
    "make_loss",
    "mask_probabilities",
    "registry_help",
    "soft_dice_score",
]

# Loading trained pre-segmentation nets, or precomputed masks (sample.py's two sources).
from preseg.io import load_preseg  # noqa: E402
from preseg.source import PresegSource  # noqa: E402

__all__ += ["PresegSource", "load_preseg"]
