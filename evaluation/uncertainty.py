"""Statistics and fusion of an ensemble of M probability maps.

The M members are the M samples of one image (``sample.py --num_ensemble M``), stacked on a
leading axis: ``member_probs`` has shape [M, ...] with values in [0, 1]. ``ensemble_statistics``
and ``fuse`` treat every element as one foreground probability (one mask channel);
``channel_statistics`` and ``fuse_channels`` read the axis after the members as the K mask
channels ([M, K, H, W]: one per class, or per overlapping region) and decide them together
(``guided_diffusion.mask_space.hard_channels``). With K = 1 the two agree exactly. Every
function accepts a numpy array or a torch tensor and returns the same kind (torch in, torch
out, on the input's device and dtype; numpy in, numpy out).
"""

import math

import numpy as np
import torch
from scipy import special

from evaluation.errors import EvaluationError
from guided_diffusion.errors import ConfigError
from guided_diffusion.mask_space import hard_channels

FUSIONS = ("mean", "vote")
# The largest binary entropy (at p = 0.5), in nats: the scale of an entropy map.
MAX_ENTROPY = math.log(2.0)
# The largest variance of values in [0, 1] (half the members at 0, half at 1): the scale of a
# variance map.
MAX_VARIANCE = 0.25


def max_entropy(num_outcomes: int) -> float:
    """The largest entropy over ``num_outcomes`` outcomes, ln n nats: the scale of an entropy map
    (ln 2 for one foreground, ln(K + 1) for K exclusive classes and the background)."""
    return math.log(num_outcomes)


def _check_members(member_probs):
    if not isinstance(member_probs, torch.Tensor):
        member_probs = np.asarray(member_probs, dtype=np.float64)
    if member_probs.ndim < 1 or member_probs.shape[0] < 1:
        raise EvaluationError(
            f"ensemble probabilities need a leading member axis K >= 1, got shape "
            f"{tuple(member_probs.shape)}"
        )
    return member_probs


def ensemble_statistics(member_probs) -> dict:
    """Mean, variance and entropy over the members of an ensemble.

    Args:
        member_probs: [M, ...] foreground probabilities in [0, 1].

    Returns:
        dict of arrays shaped [...]:
        - ``mean``: the members' mean probability p.
        - ``variance``: the population variance (divides by M, not M - 1) of the members'
          probabilities, in [0, 0.25]; 0 for M = 1.
        - ``entropy``: the binary entropy of the mean, -p ln p - (1 - p) ln(1 - p), in nats
          (natural logarithm; maximum ln 2 ~ 0.693 at p = 0.5), with 0 ln 0 = 0.
    """
    member_probs = _check_members(member_probs)
    if isinstance(member_probs, torch.Tensor):
        mean = member_probs.mean(dim=0)
        variance = member_probs.var(dim=0, unbiased=False)
    else:
        mean = member_probs.mean(axis=0)
        variance = member_probs.var(axis=0)
    return {"mean": mean, "variance": variance, "entropy": _binary_entropy(mean)}


def fuse(member_probs, fusion: str = "mean", threshold: float = 0.5):
    """Fuse the members of an ensemble into one probability map and one mask.

    Args:
        member_probs: [M, ...] foreground probabilities in [0, 1].
        fusion: ``"mean"``: fused probability = mean over members, mask = mean >= threshold.
            ``"vote"``: each member votes foreground where its probability >= threshold;
            fused probability = fraction of members voting foreground, mask = strict
            majority (more than M / 2 votes, so a tie with even M is background).
        threshold: the probability at which a pixel counts as foreground (``>=``, as MONAI's
            ``AsDiscrete(threshold=...)``).

    Returns:
        (fused_prob [...] float, mask [...] bool).
    """
    if fusion not in FUSIONS:
        raise ConfigError(f"--fusion {fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
    member_probs = _check_members(member_probs)
    is_torch = isinstance(member_probs, torch.Tensor)
    if fusion == "mean":
        fused = member_probs.mean(dim=0) if is_torch else member_probs.mean(axis=0)
        return fused, fused >= threshold
    votes = member_probs >= threshold
    num_members = member_probs.shape[0]
    if is_torch:
        count = votes.sum(dim=0)
        fused = count.to(member_probs.dtype if member_probs.is_floating_point() else torch.float32)
    else:
        count = votes.sum(axis=0)
        fused = count.astype(np.float64)
    return fused / num_members, 2 * count > num_members


def _binary_entropy(p):
    """-p ln p - (1 - p) ln(1 - p) of probabilities clamped to [0, 1], with 0 ln 0 = 0."""
    if isinstance(p, torch.Tensor):
        p = p.clamp(0.0, 1.0)
        return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    p = np.clip(p, 0.0, 1.0)
    return -(special.xlogy(p, p) + special.xlogy(1 - p, 1 - p))


def class_entropy(probs, exclusive: bool = True):
    """The entropy of per-channel probabilities [K, ...], in nats (0 ln 0 = 0).

    exclusive (classes): one map [...], the entropy of the K + 1 outcomes (background
    ``1 - sum p``, p_1 .. p_K) of probabilities that sum to at most 1, as the members of
    ``sample_members`` do (``guided_diffusion.mask_space.class_distribution``); at most
    ln(K + 1). K = 1: the binary entropy of ``ensemble_statistics``. Regions (not exclusive):
    one binary entropy per region [K, ...].
    """
    if not exclusive:
        return _binary_entropy(probs)
    if probs.shape[0] == 1:
        return _binary_entropy(probs[0])
    if isinstance(probs, torch.Tensor):
        p = probs.clamp(0.0, 1.0)
        background = (1.0 - p.sum(dim=0)).clamp_min(0.0)
        return -(torch.special.xlogy(background, background) + torch.special.xlogy(p, p).sum(dim=0))
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    background = np.clip(1.0 - p.sum(axis=0), 0.0, None)
    return -(special.xlogy(background, background) + special.xlogy(p, p).sum(axis=0))


def channel_statistics(member_probs, exclusive: bool = True) -> dict:
    """Mean, variance per channel and the entropy of an ensemble of K-channel masks.

    Args:
        member_probs: [M, K, ...] per-channel probabilities of M members.
        exclusive: classes (True) or overlapping regions (False), see ``class_entropy``.

    Returns:
        ``mean`` and ``variance`` [K, ...] (as ``ensemble_statistics``, per channel) and
        ``entropy``: ``class_entropy`` of the mean, [...] for classes, [K, ...] for regions.
        K = 1: ``ensemble_statistics`` of the one channel, with a channel axis on mean and
        variance.
    """
    member_probs = _check_members(member_probs)
    if member_probs.ndim < 2:
        raise EvaluationError(f"ensemble channels need [M, K, ...], got shape {tuple(member_probs.shape)}")
    stats = ensemble_statistics(member_probs)
    if exclusive and member_probs.shape[1] == 1:
        stats["entropy"] = stats["entropy"][0]
    elif exclusive:
        stats["entropy"] = class_entropy(stats["mean"], exclusive=True)
    return stats


def _hard(probs: torch.Tensor, exclusive: bool, channel_axis: int) -> torch.Tensor:
    """``hard_channels`` of channels on ``channel_axis`` followed by any number of axes."""
    shape = probs.shape
    flat = probs.reshape(*shape[:channel_axis + 1], -1, 1)
    return hard_channels(flat, exclusive).reshape(shape)


def fused_channels_mask(fused, fusion: str = "mean", exclusive: bool = True):
    """The decision on fused per-channel probabilities [K, ...] -> bool [K, ...].

    ``"mean"``: ``hard_channels`` (one channel or regions: p >= 0.5 each; classes: the most
    probable of the background and the K classes). ``"vote"`` (``fused`` holds the fraction of
    members that voted for each channel): a strict majority per class or region; a pixel
    where no class has one is background (members of classes vote for one class each, so at
    most one class can hold a majority).
    """
    if fusion not in FUSIONS:
        raise ConfigError(f"--fusion {fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
    if fusion == "vote":
        return fused > 0.5
    if isinstance(fused, torch.Tensor):
        return _hard(fused, exclusive, 0) > 0
    return _hard(torch.from_numpy(np.asarray(fused)), exclusive, 0).numpy() > 0


def fuse_channels(member_probs, fusion: str = "mean", exclusive: bool = True):
    """Fuse an ensemble of K-channel masks [M, K, ...] into per-channel probabilities and one
    decision: (fused [K, ...] float, mask [K, ...] bool).

    ``"mean"``: the members' mean per channel, decided by ``fused_channels_mask``. ``"vote"``:
    each member's own decision (``hard_channels``) is its vote; fused = the fraction of votes
    per channel, mask = a strict majority. K = 1 and regions: exactly ``fuse``, per channel.
    """
    if fusion not in FUSIONS:
        raise ConfigError(f"--fusion {fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
    member_probs = _check_members(member_probs)
    if member_probs.shape[1] == 1 or not exclusive:
        # One channel, or regions: every channel on its own.
        return fuse(member_probs, fusion)
    if fusion == "mean":
        fused = member_probs.mean(dim=0) if isinstance(member_probs, torch.Tensor) else member_probs.mean(axis=0)
        return fused, fused_channels_mask(fused, "mean", exclusive)
    is_torch = isinstance(member_probs, torch.Tensor)
    probs = member_probs if is_torch else torch.from_numpy(member_probs)
    votes = _hard(probs.float(), exclusive, 1)
    fused = votes.mean(dim=0).to(probs.dtype if probs.is_floating_point() else torch.float32)
    mask = 2 * votes.sum(dim=0) > probs.shape[0]
    return (fused, mask) if is_torch else (fused.numpy(), mask.numpy())
