"""Losses and Dice scores for training and validating the pre-segmentation networks.

Shapes: logits [B, K, H, W] (K classes incl. background at index 0), integer label maps
[B, H, W] with values in 0 .. K-1.
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


class SegmentationLoss(nn.Module):
    """ce_weight * cross-entropy + dice_weight * (1 - soft Dice).

    The soft Dice uses softmax probabilities, is computed over the whole batch per class, and
    averaged over the foreground classes 1 .. K-1 (background is left to the cross-entropy).
    Both terms are computed in float32, also under autocast.

    forward(logits [B, K, H, W], target [B, H, W] int64) -> scalar loss.
    """

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

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        """The unweighted terms: {"ce": scalar, "dice_loss": scalar (1 - mean foreground Dice)}."""
        _check_logits_and_target(logits, target)
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        dice = soft_dice_score(probs[:, 1:], onehot[:, 1:], smooth=self.smooth)
        return {"ce": ce, "dice_loss": 1.0 - dice.mean()}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.components(logits, target)
        return self.ce_weight * terms["ce"] + self.dice_weight * terms["dice_loss"]


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
    pred = F.one_hot(pred_labels.long(), num_classes)[..., 1:].bool()
    ref = F.one_hot(target.long(), num_classes)[..., 1:].bool()
    intersection = (pred & ref).sum(dim=(1, 2)).float()
    total = (pred.sum(dim=(1, 2)) + ref.sum(dim=(1, 2))).float()
    return torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0),
                       torch.ones_like(total))
