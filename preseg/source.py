"""Where the pre-segmentation of a batch comes from: a trained net or a folder of masks."""

import os

import torch

from data import Preprocess
from data.precomputed import PrecomputedMasks
from guided_diffusion.errors import ConfigError
from preseg.io import load_preseg
from preseg.networks import mask_probabilities


class PresegSource:
    """``source(batch)`` -> per-channel probabilities [B, K, S, S] on the network grid, on
    ``device``: the net's ``mask_probabilities`` on ``batch["image"]`` (softmax without the
    background for classes, sigmoids for regions), or each case's precomputed file
    (``data.precomputed``, label maps mapped by ``preprocess.map_label``) mapped through the
    case's own geometry onto the grid the networks see. ``preprocess`` is the run's
    ``Preprocess``.
    """

    def __init__(self, *, net=None, preseg_dir="", preprocess=None, device="cpu"):
        if (net is None) == (not preseg_dir):
            raise ConfigError("give --preseg_path or --preseg_dir, not both")
        self.net = net
        self.preseg_dir = preseg_dir
        self.masks = PrecomputedMasks(preseg_dir, preprocess) if preseg_dir else None
        self.preprocess = preprocess
        self.device = torch.device(device)

    @classmethod
    def from_flags(cls, *, preseg_path="", preseg_dir="", preprocess=None, preprocess_from_flags=False,
                   device="cpu"):
        """Load ``--preseg_path`` (checked against ``preprocess``, the diffusion model's; without
        one, the net's own preprocessing is the run's) or take ``--preseg_dir`` (with
        ``preprocess``, whose labels map label-map files); one of the two must be given.
        ``preprocess_from_flags``: ``preprocess`` is the data flags' (a raw state dict's), so a
        net trained on other flags is told which to pass, and the run paints regions in the
        net's ``regions_class_order`` (no flag gives one)."""
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
            if preprocess_from_flags:
                preprocess = preprocess.with_order_of(config["preprocess"])
            preprocess.check_same_as(config["preprocess"], preseg_path, from_flags=preprocess_from_flags)
        else:
            preprocess = Preprocess.from_dict(config["preprocess"])
        return cls(net=net, preprocess=preprocess, device=device)

    def __call__(self, batch):
        if self.net is not None:
            return mask_probabilities(self.net(batch["image"].to(self.device)), self.preprocess.exclusive)
        return self.masks(batch).to(self.device)
