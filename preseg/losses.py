"""Losses and Dice scores for training and validating the pre-segmentation networks.

Exclusive classes (binary, subset, multiclass): logits [B, K+1, H, W] (background at index 0)
against an integer label map [B, H, W] with values 0 .. K, or the dataset's one-hot label
channels [B, K, H, W] (mapped to that label map). Overlapping regions: logits [B, K, H, W], one
sigmoid per region, against the label channels [B, K, H, W]. ``make_loss`` chooses between the
two from the run's ``Preprocess``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.errors import ConfigError


def soft_dice_score(probs: torch.Tensor, target_onehot: torch.Tensor, smooth: float = 1e-5,
                    dims: tuple = (0, 2, 3)) -> torch.Tensor:
    """Soft Dice (2 |P.G| + s) / (|P| + |G| + s), summed over ``dims``.

    Args:
        probs: class probabilities [B, K, H, W].
        target_onehot: one-hot targets [B, K, H, W] (same shape, float).
        smooth: s, keeps the score defined (= 1) for a class absent from both.
        dims: dimensions summed over; the default (0, 2, 3) pools the whole batch and gives one
            score per class [K]; (2, 3) gives one per image and class [B, K].

    Returns:
        Dice scores in [0, 1], the remaining dimensions of ``probs``.
    """
    if probs.shape != target_onehot.shape:
        raise ValueError(
            f"probs {tuple(probs.shape)} and target_onehot {tuple(target_onehot.shape)} differ"
        )
    intersection = (probs * target_onehot).sum(dims)
    denominator = probs.sum(dims) + target_onehot.sum(dims)
    return (2.0 * intersection + smooth) / (denominator + smooth)


def class_index_map(label: torch.Tensor) -> torch.Tensor:
    """Exclusive label channels [B, K, H, W] {0,1} -> the index map [B, H, W] int64 (0 =
    background, k = channel k); a label map [B, H, W] is returned as it is."""
    if label.dim() == 3:
        return label
    classes = torch.arange(1, label.shape[1] + 1, device=label.device).view(1, -1, 1, 1)
    return (label.long() * classes).sum(1)


def _check_logits_and_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [B, K>=2, H, W], got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target must be [B, H, W] = {(logits.shape[0], *logits.shape[2:])} for logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise ValueError(f"target must be an int64 label map, got {target.dtype}")


class _WeightedLoss(nn.Module):
    """ce_weight * (the cross-entropy term) + dice_weight * (1 - soft Dice); see the subclasses."""

    # Name of the cross-entropy term in ``components`` (and in the training logs).
    ce_term = "ce"

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight <= 0:
            raise ConfigError(
                f"--ce_weight and --dice_weight must be >= 0 and not both 0, got "
                f"{ce_weight} and {dice_weight}"
            )
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def weighted(self, terms: dict) -> torch.Tensor:
        """The loss from the terms of ``components``."""
        return self.ce_weight * terms[self.ce_term] + self.dice_weight * terms["dice_loss"]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weighted(self.components(logits, target))


class SegmentationLoss(_WeightedLoss):
    """ce_weight * cross-entropy + dice_weight * (1 - soft Dice), for exclusive classes.

    The soft Dice uses softmax probabilities, is computed over the whole batch per class, and
    averaged over the K foreground classes 1 .. K (background is left to the cross-entropy).
    Both terms are computed in float32, also under autocast.

    forward(logits [B, K+1, H, W], target [B, H, W] int64 in 0 .. K or label channels
    [B, K, H, W]) -> scalar loss.
    """

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        """The unweighted terms: {"ce": scalar, "dice_loss": scalar (1 - mean foreground Dice)}."""
        if target.dim() == 4:
            if target.shape[1] != logits.shape[1] - 1:
                raise ValueError(f"label channels {tuple(target.shape)} do not fit logits "
                                 f"{tuple(logits.shape)} (K channels need K+1 logits)")
            target = class_index_map(target)
        _check_logits_and_target(logits, target)
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        dice = soft_dice_score(probs[:, 1:], onehot[:, 1:], smooth=self.smooth)
        return {"ce": ce, "dice_loss": 1.0 - dice.mean()}


class RegionLoss(_WeightedLoss):
    """ce_weight * binary cross-entropy + dice_weight * (1 - soft Dice), for overlapping regions.

    One sigmoid per region; the BCE is averaged over every pixel and region, the soft Dice is
    computed over the whole batch per region and averaged over the regions. Float32 throughout.

    forward(logits [B, K, H, W], target label channels [B, K, H, W] {0,1}) -> scalar loss.
    """

    ce_term = "bce"

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        """The unweighted terms: {"bce": scalar, "dice_loss": scalar (1 - mean region Dice)}."""
        if logits.dim() != 4 or target.shape != logits.shape:
            raise ValueError(f"region logits {tuple(logits.shape)} and label channels "
                             f"{tuple(target.shape)} must both be [B, K, H, W]")
        logits = logits.float()
        target = (target > 0).float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = soft_dice_score(torch.sigmoid(logits), target, smooth=self.smooth)
        return {"bce": bce, "dice_loss": 1.0 - dice.mean()}


def make_loss(preprocess, *, ce_weight: float = 1.0, dice_weight: float = 1.0) -> _WeightedLoss:
    """The loss of the supervised nets for the run's label mode (``preprocess.exclusive``):
    softmax CE + soft Dice for classes, BCE + soft Dice for regions."""
    loss = SegmentationLoss if preprocess.exclusive else RegionLoss
    return loss(ce_weight=ce_weight, dice_weight=dice_weight)


def channel_dice(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Hard Dice per image and channel: bool [B, K, H, W] masks -> float32 [B, K],
    2 |P & G| / (|P| + |G|); 1.0 where a channel is empty in both, 0.0 where in only one."""
    if pred.shape != ref.shape or pred.dim() != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and ref {tuple(ref.shape)} must both be [B, K, H, W]")
    pred, ref = pred.bool(), ref.bool()
    intersection = (pred & ref).sum(dim=(2, 3)).float()
    total = (pred.sum(dim=(2, 3)) + ref.sum(dim=(2, 3))).float()
    return torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0),
                       torch.ones_like(total))


def dice_per_image(pred_labels: torch.Tensor, target: torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    """Hard Dice per image and foreground class, for validation.

    Args:
        pred_labels: predicted label map [B, H, W] (e.g. ``logits.argmax(1)``), values 0..K-1.
        target: reference label map [B, H, W], values 0..K-1.
        num_classes: K, incl. background.

    Returns:
        float32 [B, K-1]: 2 |P & G| / (|P| + |G|) for classes 1..K-1; 1.0 where a class is
        absent from both prediction and reference, 0.0 where it is in only one of them.
    """
    if pred_labels.shape != target.shape or pred_labels.dim() != 3:
        raise ValueError(
            f"pred_labels {tuple(pred_labels.shape)} and target {tuple(target.shape)} must both "
            "be [B, H, W]"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    pred = F.one_hot(pred_labels.long(), num_classes).permute(0, 3, 1, 2)[:, 1:]
    ref = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2)[:, 1:]
    return channel_dice(pred, ref)
