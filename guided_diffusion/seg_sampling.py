"""Segmentation samplers: vanilla DDPM, DDIM-k and the truncated ADDPM process, as one function.

Every sampler is the same reverse loop (``GaussianDiffusion.sample_loop``) over a different
decreasing list of timesteps and a different start state:

    ddpm    [N-1, ..., 0, -1]     from pure noise (Wolleb et al.)
    ddim    K spaced steps + [-1] from pure noise, DDIM updates
    addpm   [pre_t, ..., T]       from q_sample(s(preseg), pre_t), optionally K spaced steps,
            then a one-step final map from x_T to the mask (the denoising net, or the
            UNet's own x0 prediction at level T)
    preseg  the pre-segmentation alone, no UNet evaluation

The pre-segmentation and the denoising net enter as tensors and callables, so this module
knows nothing of their architectures.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from guided_diffusion.errors import ConfigError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.mask_space import class_distribution, hard_channels, to_diffusion_space, to_probability
from guided_diffusion.respace import full_chain_timesteps, truncated_timesteps
from guided_diffusion.run_dir import mix_seed

SAMPLERS = ("addpm", "ddpm", "ddim", "preseg")
# addpm starts from the noised pre-segmentation; preseg is the pre-segmentation alone.
PRESEG_SAMPLERS = ("addpm", "preseg")
FINAL_STEPS = ("denoiser", "x0")
# The level where ADDPM's truncated process ends when no denoising net names its own T (the paper's).
DEFAULT_T = 250
STEP_METHODS = ("ddpm", "ddim")

# x_T [N,K,H,W] and the matching images [N,C,H,W] -> per-channel probabilities [N,K,H,W].
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerPlan:
    """What one sampler run does: the levels it walks and how it moves between them."""

    sampler: str
    timesteps: tuple
    method: str
    eta: float
    final_step: Optional[str]

    @property
    def needs_preseg(self) -> bool:
        """True when the sampler reads a pre-segmentation (--preseg_path or --preseg_dir)."""
        return self.sampler in PRESEG_SAMPLERS

    @property
    def needs_denoiser(self) -> bool:
        """True when x_T is mapped to the mask by the denoising net (--denoiser_path)."""
        return self.final_step == "denoiser"

    @property
    def unet_evaluations(self) -> int:
        """UNet forward passes per ensemble member."""
        return len(self.evaluated_levels)

    @property
    def evaluated_levels(self) -> tuple:
        """The levels at which the UNet is asked for a prediction, in order."""
        if self.sampler == "preseg":
            return ()
        return tuple(self.timesteps[:-1]) + ((self.timesteps[-1],) if self.final_step == "x0" else ())


def untrained_levels_warning(plan: SamplerPlan, training: Optional[dict], source: str) -> str:
    """One line when ``plan`` asks the UNet about levels outside its training window, else "".

    ``training`` is the checkpoint's ``config["training"]`` (None for a model trained on the
    whole chain, as every raw state dict is). A window with a whole-chain share
    (``t_range_mix`` > 0) has seen every level.
    """
    window = (training or {}).get("t_range")
    if not window or float(training.get("t_range_mix") or 0.0) > 0 or not plan.evaluated_levels:
        return ""
    lo, hi = int(window[0]), int(window[1])
    outside = [t for t in plan.evaluated_levels if not lo <= t <= hi]
    if not outside:
        return ""
    return (
        f"{source} was trained on levels {lo}..{hi} only (--t_range {lo},{hi}), but --sampler "
        f"{plan.sampler} asks it about {len(outside)} of its {len(plan.evaluated_levels)} levels "
        f"outside them ({max(outside)}..{min(outside)}); expect poor masks there"
    )


def case_generator(seed: int, en_num: int, case_ids: Sequence[str], device) -> torch.Generator:
    """The generator of a batch's sampling noise, a function of the seed, the ensemble index and
    the batch's case ids alone: a result does not change with the rank that runs it, the cases a
    rerun skips, or (in validation) the step at which it is drawn."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, en_num, ",".join(case_ids), scheme="text"))


def _spaced_full_chain(sampler: str, num_timesteps: int, respacing: str, sampling_steps: int) -> list:
    """``full_chain_timesteps``, with its errors naming the flag the user gave (--sampling_steps)."""
    try:
        return full_chain_timesteps(num_timesteps, respacing)
    except ConfigError:
        how = "an integer stride" if sampler == "ddim" else "even spacing"
        raise ConfigError(
            f"--sampling_steps {sampling_steps}: --sampler {sampler} cannot take exactly that many "
            f"steps of the {num_timesteps}-step chain with {how}"
        ) from None


def plan_sampler(
    sampler: str,
    *,
    num_timesteps: int,
    pre_t: int = 300,
    T: int = 250,
    sampling_steps: int = 0,
    step_method: str = "ddpm",
    eta: float = 0.0,
    final_step: str = "denoiser",
    timestep_respacing: str = "",
) -> SamplerPlan:
    """Turn the sampling flags into the list of levels the reverse loop walks.

    ``sampling_steps`` 0 means every step of the chain (ddpm, addpm); ddim needs K >= 1.
    ``timestep_respacing`` (improved-diffusion's strings: "250", "ddim50", "10,10,10") may
    replace ``sampling_steps`` for the samplers that start from pure noise.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if step_method not in STEP_METHODS:
        raise ConfigError(f"--step_method {step_method!r} is unknown; choose ddpm or ddim")
    if final_step not in FINAL_STEPS:
        raise ConfigError(f"--final_step {final_step!r} is unknown; choose denoiser or x0")
    if sampling_steps < 0:
        raise ConfigError(f"--sampling_steps must be >= 0, got {sampling_steps}")
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"--eta must lie in [0, 1], got {eta}")
    if timestep_respacing:
        if sampler not in ("ddpm", "ddim"):
            raise ConfigError(
                f"--timestep_respacing applies to --sampler ddpm or ddim; --sampler {sampler} "
                "spaces its steps with --sampling_steps"
            )
        if sampling_steps:
            raise ConfigError("give --sampling_steps or --timestep_respacing, not both")
        steps = full_chain_timesteps(num_timesteps, timestep_respacing)
        return SamplerPlan(sampler, tuple(steps), sampler, eta if sampler == "ddim" else 0.0, None)
    if sampler == "preseg":
        return SamplerPlan("preseg", (), "none", 0.0, None)
    if sampler == "ddpm":
        respacing = str(sampling_steps) if sampling_steps else ""
        steps = _spaced_full_chain(sampler, num_timesteps, respacing, sampling_steps)
        return SamplerPlan("ddpm", tuple(steps), "ddpm", 0.0, None)
    if sampler == "ddim":
        if sampling_steps < 1:
            raise ConfigError("--sampler ddim needs --sampling_steps K (e.g. 100)")
        steps = _spaced_full_chain(sampler, num_timesteps, f"ddim{sampling_steps}", sampling_steps)
        return SamplerPlan("ddim", tuple(steps), "ddim", eta, None)
    if not 0 <= T < pre_t < num_timesteps:
        raise ConfigError(
            f"--pre_t {pre_t} and --T {T} must satisfy 0 <= T < pre_t < diffusion_steps ({num_timesteps})"
        )
    steps = truncated_timesteps(pre_t, T, sampling_steps or None)
    return SamplerPlan("addpm", tuple(steps), step_method, eta, final_step)


@torch.no_grad()
def sample_members(
    plan: SamplerPlan,
    *,
    diffusion: GaussianDiffusion,
    model: Optional[torch.nn.Module],
    images: torch.Tensor,
    num_ensemble: int,
    mask_space: str,
    preseg_probs: Optional[torch.Tensor] = None,
    denoise_fn: Optional[DenoiseFn] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    mask_channels: int = 1,
    exclusive: bool = True,
) -> torch.Tensor:
    """Run ``num_ensemble`` members per image as one batch.

    images:        [B, C, H, W]
    preseg_probs:  [B, K, H, W] per-channel probabilities (addpm and preseg samplers)
    mask_channels: K, the mask's channels (one per class or region; the model's)
    exclusive:     classes (the truncated start takes the most probable one per pixel) or
                   overlapping regions (each channel thresholded), see ``hard_channels``
    returns:       [B, M, K, H, W] per-channel probabilities of every member
                   (M = 1 for the deterministic preseg sampler); classes' sum to at most 1
                   (``class_distribution``)
    """
    batch, _, height, width = images.shape
    if isinstance(num_ensemble, bool) or not isinstance(num_ensemble, int) or num_ensemble < 1:
        raise ConfigError(f"--num_ensemble must be a positive integer, got {num_ensemble!r}")
    if plan.needs_preseg and preseg_probs is None:
        raise ConfigError(f"--sampler {plan.sampler} needs a pre-segmentation (--preseg_path or --preseg_dir)")
    if plan.needs_preseg and preseg_probs.shape[1] != mask_channels:
        raise ConfigError(f"the pre-segmentation has {preseg_probs.shape[1]} channels, the model {mask_channels}")
    if plan.sampler == "preseg":
        return preseg_probs.unsqueeze(1).float()
    if plan.needs_denoiser and denoise_fn is None:
        raise ConfigError("--final_step denoiser needs --denoiser_path")

    # Members of one image sit next to each other: [img0 x K, img1 x K, ...].
    member_images = images.repeat_interleave(num_ensemble, dim=0)
    shape = (batch * num_ensemble, mask_channels, height, width)
    if plan.sampler == "addpm":
        preseg_mask = hard_channels(preseg_probs.float(), exclusive).repeat_interleave(num_ensemble, dim=0)
        start_level = torch.full((shape[0],), plan.timesteps[0], device=images.device, dtype=torch.long)
        noise = torch.randn(shape, generator=generator, device=images.device, dtype=images.dtype)
        start = diffusion.q_sample(to_diffusion_space(preseg_mask, mask_space), start_level, noise=noise)
    else:
        start = torch.randn(shape, generator=generator, device=images.device, dtype=images.dtype)

    out = diffusion.sample_loop(
        model,
        member_images,
        start,
        list(plan.timesteps),
        method=plan.method,
        eta=plan.eta,
        generator=generator,
        progress=progress,
    )
    if plan.sampler != "addpm":
        probs = class_distribution(to_probability(out["sample"], mask_space), exclusive)
    elif plan.final_step == "denoiser":
        probs = denoise_fn(out["sample"], member_images)
    else:
        level_T = torch.full((shape[0],), plan.timesteps[-1], device=images.device, dtype=torch.long)
        pred = diffusion.p_mean_variance(model, member_images, out["sample"], level_T)["pred_xstart"]
        probs = class_distribution(to_probability(pred, mask_space), exclusive)
    return probs.reshape(batch, num_ensemble, mask_channels, height, width).float()
