"""The one-step denoising network: a mask noised to level T -> the clean mask, in one step.

ADDPM runs the diffusion UNet's reverse chain only from ``pre_t`` down to ``T`` and hands
``x_T`` to this net, trained on exactly that noise level: ``x_T = q_sample(s(label), T)``
with the diffusion model's schedule (``--noise_schedule``, ``--diffusion_steps``) and mask
space ``s`` (``guided_diffusion.mask_space``). The network itself comes from the
pre-segmentation registry (``--arch`` as in ``train_preseg_network.py``); its input is built by
``denoiser_input`` (the noisy mask's K channels alone, or with the image channels in front),
its output is logits of the label mode's ``Preprocess.network_classes`` (``[B, 2, H, W]`` for one
foreground, K + 1 for exclusive classes, K sigmoids for regions), trained with the
pre-segmentation's losses.

Checkpoint config (kind "denoiser"): the network keys of ``preseg.io.NETWORK_KEYS`` plus
``T``, ``diffusion_steps``, ``noise_schedule``, ``mask_space``, ``denoiser_cond``,
``image_channels``, ``preprocess`` and ``args``. A sampler checks its own settings against it
with ``check_denoiser_matches``.
"""

import torch

from guided_diffusion.errors import CheckpointError, ConfigError
from guided_diffusion.gaussian_diffusion import (
    BETA_SCHEDULES,
    GaussianDiffusion,
    build_model_input,
    get_named_beta_schedule,
)
from guided_diffusion.mask_space import MASK_SPACES, label_channels, to_diffusion_space
from guided_diffusion.script_util import HELP, diffusion_defaults
from preseg.io import load_network_checkpoint
from preseg.networks import mask_probabilities

DENOISER_CONDS = ("none", "image")
# What a checkpoint must record so that a sampler can check it against its truncated loop.
SCHEDULE_KEYS = ("T", "diffusion_steps", "noise_schedule", "mask_space")


def denoiser_defaults():
    """Flags of the noise level and of the net's input.

    The schedule defaults are the original ADDPM README's DIFFUSION_FLAGS
    (``--diffusion_steps 1000 --noise_schedule cosine``), with which its diffusion model is
    trained; the denoiser must match them.
    """
    return dict(T=250, diffusion_steps=1000, noise_schedule="cosine", mask_space="pm1",
                denoiser_cond="none")


DENOISER_HELP = {
    "T": (
        "noise level (0-based timestep) the net denoises from: it is trained on "
        "q_sample(label, T); sample.py's truncated loop must stop at the same T"
    ),
    "diffusion_steps": HELP["diffusion_steps"] + "; must match the diffusion model's",
    "noise_schedule": HELP["noise_schedule"] + "; must match the diffusion model's",
    "mask_space": HELP["mask_space"] + "; must match the diffusion model's",
    "denoiser_cond": (
        "input of the net: none = the noisy mask alone (as in ADDPM); image = the image "
        "channels and the noisy mask"
    ),
}


def ignored_diffusion_defaults():
    """The diffusion flags of train_addpm.py that do not concern the denoising net (it is
    trained at one noise level of the schedule): accepted, so that the same $DIFFUSION_FLAGS
    can be passed to both trainers, and recorded in the checkpoint as ignored."""
    return {key: value for key, value in diffusion_defaults().items() if key not in denoiser_defaults()}


IGNORED_HELP = {
    key: HELP[key] + "; accepted as in train_addpm.py's $DIFFUSION_FLAGS, ignored here (it does "
    "not concern the denoising net)"
    for key in ignored_diffusion_defaults()
}


def check_denoiser_settings(*, T, diffusion_steps, noise_schedule, mask_space, denoiser_cond):
    """Raise ConfigError (one line naming the flag) for settings that cannot be trained."""
    if noise_schedule not in BETA_SCHEDULES:
        raise ConfigError(
            f"--noise_schedule: unknown value {noise_schedule!r} (choose one of {', '.join(BETA_SCHEDULES)})"
        )
    if mask_space not in MASK_SPACES:
        raise ConfigError(
            f"--mask_space: unknown value {mask_space!r} (choose one of {', '.join(MASK_SPACES)})"
        )
    if denoiser_cond not in DENOISER_CONDS:
        raise ConfigError(
            f"--denoiser_cond: unknown value {denoiser_cond!r} (choose one of {', '.join(DENOISER_CONDS)})"
        )
    if diffusion_steps < 1:
        raise ConfigError(f"--diffusion_steps must be positive, got {diffusion_steps}")
    if not 0 <= T < diffusion_steps:
        raise ConfigError(f"--T {T} must lie in [0, --diffusion_steps) = [0, {diffusion_steps})")


def denoiser_in_channels(image_channels, denoiser_cond, mask_channels=1):
    """Channels of the net's input: the noisy mask's K plus the image's with ``image``."""
    return mask_channels + (image_channels if denoiser_cond == "image" else 0)


def denoiser_input(x_T, image, cond):
    """The denoising net's input; the one function used by its trainer and by sample.py.

    :param x_T: [B, K, H, W] noisy mask in diffusion space.
    :param image: [B, C, H, W] preprocessed image, or None when ``cond`` is "none".
    :param cond: "none" -> ``x_T``; "image" -> ``[B, C+K, H, W]``, image channels first
        (``build_model_input``, the diffusion UNet's layout).
    """
    if cond == "none":
        return x_T
    if cond == "image":
        if image is None:
            raise ValueError("denoiser_input: cond 'image' needs the image")
        return build_model_input(image, x_T)
    raise ConfigError(
        f"--denoiser_cond: unknown value {cond!r} (choose one of {', '.join(DENOISER_CONDS)})"
    )


class NoisyMaskBatch:
    """``batch_to_input_target`` of the denoising trainer: (noisy label at T [+ image], label).

    ``x_T = sqrt(abar_T) s(label) + sqrt(1 - abar_T) eps`` with ``eps`` drawn from the given
    generator: fresh noise for every training batch, and a fixed draw in validation (the
    engine re-seeds the validation generator each time).
    """

    def __init__(self, *, T, diffusion_steps, noise_schedule, mask_space, denoiser_cond):
        check_denoiser_settings(T=T, diffusion_steps=diffusion_steps, noise_schedule=noise_schedule,
                                mask_space=mask_space, denoiser_cond=denoiser_cond)
        self.T = T
        self.mask_space = mask_space
        self.denoiser_cond = denoiser_cond
        self.diffusion = GaussianDiffusion(betas=get_named_beta_schedule(noise_schedule, diffusion_steps))

    def noisy_mask(self, label, generator):
        """``label`` [B, H, W] or [B, K, H, W] int64 -> x_T [B, K, H, W] float32 in diffusion space."""
        x_start = to_diffusion_space(label_channels(label), self.mask_space)
        t = torch.full((label.shape[0],), self.T, dtype=torch.long, device=label.device)
        return self.diffusion.q_sample(x_start, t, generator=generator)

    def __call__(self, batch, generator):
        x_T = self.noisy_mask(batch["label"], generator)
        return denoiser_input(x_T, batch["image"], self.denoiser_cond), batch["label"]


def load_denoiser(path, device="cpu"):
    """Load a checkpoint written by ``train_denoising_network.py``.

    :return: ``(model, config)``: the net in eval mode on ``device``, mapping
        ``denoiser_input(x_T, image, config["denoiser_cond"])`` to logits [B, num_classes, H, W], and
        its config (network keys, T, diffusion_steps, noise_schedule, mask_space,
        denoiser_cond, image_channels, preprocess, args).
    :raises CheckpointError: missing, foreign or wrong-kind file, incomplete config, or
        weights that do not fit.
    """
    model, config = load_network_checkpoint(path, "denoiser", device)
    missing = [key for key in (*SCHEDULE_KEYS, "denoiser_cond") if key not in config]
    if missing:
        raise CheckpointError(f"{path}: denoiser checkpoint config lacks {', '.join(missing)}")
    return model, config


def check_denoiser_matches(config, *, T=None, noise_schedule=None, diffusion_steps=None,
                           mask_space=None, source="the denoiser checkpoint"):
    """Refuse a denoiser trained for another noise level or diffusion process.

    The truncated reverse loop ends at ``x_T`` of a given schedule; a denoiser trained on
    another ``T``, schedule, number of steps or mask space receives inputs of another noise
    level or range than it learned, and fails silently. A value given as None is not checked.

    :param config: the denoiser checkpoint's config.
    :param source: the checkpoint's path, named in the message.
    :raises ConfigError: one line naming both values, e.g. ``--T 200 does not match the
        denoiser checkpoint den.pt, trained at T=250``.
    """
    if T is not None and int(config["T"]) != int(T):
        raise ConfigError(
            f"--T {T} does not match the denoiser checkpoint {source}, trained at T={config['T']}"
        )
    given = {"noise_schedule": noise_schedule, "diffusion_steps": diffusion_steps,
             "mask_space": mask_space}
    for key, value in given.items():
        if value is not None and config[key] != value:
            raise ConfigError(
                f"{key} {value} (of the diffusion model) does not match the denoiser "
                f"checkpoint {source}, trained with {key}={config[key]}"
            )


def load_final_step(path, *, preprocess, schedule, T=-1, device="cpu", preprocess_from_flags=False):
    """The denoising net of ``path`` as ADDPM's final step, checked against the diffusion model.

    :param preprocess: the diffusion model's ``Preprocess``; the net must have seen the same inputs.
    :param schedule: the diffusion model's ``noise_schedule``, ``diffusion_steps`` and ``mask_space``.
    :param T: the level where the truncated process ends; -1 = the net's own T.
    :param preprocess_from_flags: ``preprocess`` is the data flags' (a raw state dict's), so a
        net trained on other flags is told which to pass.
    :return: ``(denoise, T)``: ``denoise(x_T [N,K,S,S], images [N,C,S,S]) -> per-channel
        probabilities [N,K,S,S]`` (``mask_probabilities`` of the label mode) and the level it expects.
    :raises ConfigError: another preprocessing, T, schedule or mask space than the net's.
    """
    net, config = load_denoiser(path, device)
    preprocess.check_same_as(config["preprocess"], path, from_flags=preprocess_from_flags)
    T = int(config["T"]) if T < 0 else int(T)
    check_denoiser_matches(config, T=T, source=path, **schedule)
    cond, exclusive = config["denoiser_cond"], preprocess.exclusive

    def denoise(x_T, images):
        return mask_probabilities(net(denoiser_input(x_T, images, cond)), exclusive)

    return denoise, T
