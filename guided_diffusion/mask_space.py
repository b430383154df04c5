"""The one map between {0,1} masks and the space the diffusion model works in.

Training (``q_sample`` of the label) and sampling (``q_sample`` of the pre-segmentation, then
the final probability) both go through these two functions, so the two can never disagree.

- ``"pm1"`` (default): {0,1} -> {-1,+1}, the data range improved-diffusion assumes (its
  ``clip_denoised`` clamps to [-1,1] and its decoder likelihood bins [-1,1]).
- ``"01"``: the mask stays in {0,1}, as the older improved-diffusion-based segmentation code
  trained it; kept so that models trained that way can be sampled correctly.
"""

import torch

from guided_diffusion.errors import ConfigError

MASK_SPACES = ("pm1", "01")


def _check(mask_space):
    if mask_space not in MASK_SPACES:
        raise ConfigError(
            f"--mask_space: unknown value {mask_space!r} (choose one of {', '.join(MASK_SPACES)})"
        )


def to_diffusion_space(mask01: torch.Tensor, mask_space: str) -> torch.Tensor:
    """Map a {0,1} (or [0,1]) float mask of any shape into diffusion space.

    :param mask01: float tensor, values in [0, 1].
    :param mask_space: one of ``MASK_SPACES``.
    :return: tensor of the same shape: ``2 * m - 1`` for ``"pm1"``, ``m`` for ``"01"``.
    """
    _check(mask_space)
    if mask_space == "pm1":
        return mask01 * 2.0 - 1.0
    return mask01


def to_probability(x: torch.Tensor, mask_space: str) -> torch.Tensor:
    """Inverse of :func:`to_diffusion_space`, clamped to [0, 1].

    :param x: tensor in diffusion space (any shape); values outside the space's range are
        clamped, since a model's x0 prediction or a final sample may overshoot it.
    :return: tensor of the same shape with values in [0, 1].
    """
    _check(mask_space)
    if mask_space == "pm1":
        x = (x + 1.0) * 0.5
    return x.clamp(0.0, 1.0)


def label_channels(label: torch.Tensor) -> torch.Tensor:
    """A label batch -> float {0,1} mask channels [B, K, H, W].

    :param label: int {0,1} targets as the datasets give them: [B, H, W] (one channel) or
        [B, K, H, W] (one channel per class or region).
    """
    if label.dim() == 3:
        label = label.unsqueeze(1)
    if label.dim() != 4:
        raise ValueError(f"label must be [B, H, W] or [B, K, H, W], got {tuple(label.shape)}")
    return (label > 0).float()


def hard_channels(probs: torch.Tensor, exclusive: bool) -> torch.Tensor:
    """Per-channel probabilities [..., K, H, W] -> float {0,1} decisions of the same shape.

    One channel (K = 1) and regions: ``p >= 0.5`` per channel. Exclusive classes (K > 1): the
    most probable of background (``1 - sum p``) and the K classes, so at most one channel is
    on per pixel.
    """
    if not exclusive or probs.shape[-3] == 1:
        return (probs >= 0.5).to(probs.dtype)
    background = (1.0 - probs.sum(dim=-3, keepdim=True)).clamp_min(0.0)
    winner = torch.cat([background, probs], dim=-3).argmax(dim=-3, keepdim=True)
    classes = torch.arange(1, probs.shape[-3] + 1, device=probs.device).view(-1, 1, 1)
    return (winner == classes).to(probs.dtype)


def class_distribution(probs: torch.Tensor, exclusive: bool) -> torch.Tensor:
    """Per-channel probabilities [..., K, H, W] of exclusive classes made a distribution.

    The diffusion UNet predicts each class channel on its own (``to_probability`` clamps each to
    [0, 1]), so where several classes claim a pixel they may sum above 1; they are divided by
    their sum there, leaving the background ``1 - sum p`` at 0. Where they sum to at most 1, and
    for one channel or regions, nothing changes. ``hard_channels`` decides each member the same
    either way; the mean of several members (``--fusion mean``) is that of the distributions.
    """
    if not exclusive or probs.shape[-3] == 1:
        return probs
    return probs / probs.sum(dim=-3, keepdim=True).clamp_min(1.0)
