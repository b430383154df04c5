"""Which levels a sampler visits: respacing of the full chain and the truncated ADDPM segment.

A model is always trained on the full N-step chain. Sampling walks a decreasing list of
levels with ``GaussianDiffusion.sample_loop``; between two kept levels (t, s) it uses the
respaced chain's posterior, so no second diffusion object is needed. ``respaced_betas`` builds
the betas of that respaced chain explicitly (improved-diffusion's ``SpacedDiffusion``), which
lets tests check that both views agree.
"""

from typing import Iterable

import numpy as np

from guided_diffusion.errors import ConfigError


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """The levels to keep from an N-step chain, with improved-diffusion's semantics.

    ``section_counts`` is a list of ints or a string:

    - ``"250"`` or ``"10,10,10"``: split the chain into ``len(counts)`` equal sections (the
      first ``N % len`` get one extra step) and take ``count`` evenly spaced levels from each,
      both ends of the section included (a count of 1 takes the section's first level).
    - ``"ddimK"``: the integer stride ``i`` for which ``range(0, N, i)`` has exactly K levels,
      as the DDIM paper spaces its steps.
    - ``""``: every level.

    :return: set of 0-based levels.
    """
    flag = "--timestep_respacing"
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text == "":
            return set(range(num_timesteps))
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ConfigError(f"{flag}: cannot parse {section_counts!r} (expected e.g. 'ddim50')") from None
            for stride in range(1, max(num_timesteps, 2)):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ConfigError(
                f"{flag}: cannot take exactly {desired} steps of a {num_timesteps}-step chain "
                "with an integer stride"
            )
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ConfigError(
                f"{flag}: cannot parse {section_counts!r} (expected e.g. '250', '10,10,10' or 'ddim50')"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ConfigError(f"{flag}: section counts must be non-negative integers, got {section_counts!r}")

    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start = 0
    kept = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(
                f"{flag}: cannot take {count} steps from a section of {size} steps "
                f"({num_timesteps}-step chain, {section_counts!r})"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> np.ndarray:
    """Betas of the chain that keeps only ``use_timesteps``: ``1 - abar[k_i] / abar[k_{i-1}]``.

    The cumulative product of ``1 - betas`` equals ``alphas_cumprod`` at the kept levels.

    :param alphas_cumprod: float64 [N] of the full chain.
    :return: float64 [len(use_timesteps)], in increasing level order.
    """
    keep = set(int(t) for t in use_timesteps)
    last = 1.0
    betas = []
    for level, abar in enumerate(alphas_cumprod):
        if level in keep:
            betas.append(1.0 - abar / last)
            last = abar
    return np.array(betas, dtype=np.float64)


def full_chain_timesteps(num_timesteps: int, respacing: str = "") -> list:
    """Levels for sampling from pure noise down to clean: kept levels descending, then -1.

    ``""`` -> ``[N-1, ..., 0, -1]`` (N model evaluations); ``"ddim100"`` or ``"100"`` -> the
    kept levels of :func:`space_timesteps`, descending, then -1.
    """
    kept = space_timesteps(num_timesteps, respacing)
    if not kept:
        raise ConfigError(f"--timestep_respacing: {respacing!r} keeps no steps")
    return sorted(kept, reverse=True) + [-1]


def truncated_timesteps(pre_t: int, T: int, num_steps=None, *, num_timesteps=None) -> list:
    """Levels of the truncated ADDPM segment, from pre_t down to T, both included.

    :param pre_t: the level the noised pre-segmentation starts at.
    :param T: the level the segment stops at (the denoising net's noise level).
    :param num_steps: None -> every level (pre_t - T model evaluations); K -> K evaluations
        over K + 1 distinct integer levels evenly spaced between pre_t and T.
    :param num_timesteps: if given, also check ``pre_t < num_timesteps``.
    :return: strictly decreasing list of ints ``[pre_t, ..., T]``.
    """
    pre_t, T = int(pre_t), int(T)
    if T < 0:
        raise ConfigError(f"--T must be >= 0, got {T}")
    if pre_t <= T:
        raise ConfigError(f"--pre_t ({pre_t}) must be larger than --T ({T})")
    if num_timesteps is not None and pre_t >= num_timesteps:
        raise ConfigError(
            f"--pre_t ({pre_t}) must be smaller than --diffusion_steps ({num_timesteps})"
        )
    span = pre_t - T
    if num_steps is None:
        return list(range(pre_t, T - 1, -1))
    k = int(num_steps)
    if k < 1:
        raise ConfigError(f"--sampling_steps must be >= 1, got {k}")
    if k > span:
        raise ConfigError(
            f"--sampling_steps ({k}) cannot exceed --pre_t - --T ({pre_t} - {T} = {span})"
        )
    # Adjacent positions are span / k >= 1 apart, so rounding half up keeps them distinct.
    positions = np.linspace(pre_t, T, k + 1)
    levels = [int(np.floor(p + 0.5)) for p in positions]
    levels[0], levels[-1] = pre_t, T
    return levels
