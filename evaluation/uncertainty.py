"""Statistics and fusion of an ensemble of K foreground-probability maps.

The K members are the K samples of one image (``sample.py --num_ensemble K``), stacked on a
leading axis: ``member_probs`` has shape [K, ...] with values in [0, 1]. Both functions
accept a numpy array or a torch tensor and return the same kind (torch in, torch out, on the
input's device and dtype; numpy in, numpy out).
"""

import math

import numpy as np
import torch
from scipy import special

from evaluation.errors import EvaluationError
from guided_diffusion.errors import ConfigError

FUSIONS = ("mean", "vote")
# The largest binary entropy (at p = 0.5), in nats: the scale of an entropy map.
MAX_ENTROPY = math.log(2.0)
# The largest variance of values in [0, 1] (half the members at 0, half at 1): the scale of a
# variance map.
MAX_VARIANCE = 0.25


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
        member_probs: [K, ...] foreground probabilities in [0, 1].

    Returns:
        dict of arrays shaped [...]:
        - ``mean``: the members' mean probability p.
        - ``variance``: the population variance (divides by K, not K - 1) of the members'
          probabilities, in [0, 0.25]; 0 for K = 1.
        - ``entropy``: the binary entropy of the mean, -p ln p - (1 - p) ln(1 - p), in nats
          (natural logarithm; maximum ln 2 ~ 0.693 at p = 0.5), with 0 ln 0 = 0.
    """
    member_probs = _check_members(member_probs)
    if isinstance(member_probs, torch.Tensor):
        mean = member_probs.mean(dim=0)
        variance = member_probs.var(dim=0, unbiased=False)
        p = mean.clamp(0.0, 1.0)
        entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    else:
        mean = member_probs.mean(axis=0)
        variance = member_probs.var(axis=0)
        p = np.clip(mean, 0.0, 1.0)
        entropy = -(special.xlogy(p, p) + special.xlogy(1 - p, 1 - p))
    return {"mean": mean, "variance": variance, "entropy": entropy}


def fuse(member_probs, fusion: str = "mean", threshold: float = 0.5):
    """Fuse the members of an ensemble into one probability map and one mask.

    Args:
        member_probs: [K, ...] foreground probabilities in [0, 1].
        fusion: ``"mean"``: fused probability = mean over members, mask = mean >= threshold.
            ``"vote"``: each member votes foreground where its probability >= threshold;
            fused probability = fraction of members voting foreground, mask = strict
            majority (more than K / 2 votes, so a tie with even K is background).
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
