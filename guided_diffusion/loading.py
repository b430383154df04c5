"""Load the conditional diffusion UNet for sampling: our checkpoint, or a raw state dict.

A checkpoint written by ``train_addpm.py`` rebuilds itself from its config. A raw
``{name: tensor}`` state dict (``savedmodel.pt`` of improved-diffusion-based segmentation
code) is built from the flags the user gives (MODEL_FLAGS, DIFFUSION_FLAGS) and the
preprocessing the caller builds from the data flags (``data.preprocess_from_args``); its image
channel count is read off the first convolution. This module reads no data flags itself.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from guided_diffusion.checkpoint import (
    file_sha256,
    is_raw_state_dict,
    load_checkpoint,
    load_raw_object,
    load_weights,
)
from guided_diffusion.errors import CheckpointError, ConfigError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    create_model,
    diffusion_config,
    model_and_diffusion_from_config,
    model_config,
    str2bool,
)

_FIRST_CONV = "input_blocks.0.0.weight"
_LAST_CONV = "out.2.weight"


@dataclass
class DiffusionBundle:
    """The sampling-side view of a diffusion checkpoint."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    config: dict  # holds "preprocess" (a Preprocess dict) among the rebuild flags
    mask_space: str
    schedule: dict  # noise_schedule, diffusion_steps, mask_space: what the denoiser must match
    source: str
    sha256: str
    weights: str  # "ema:<rate>", "model" or "raw"


def load_diffusion_model(
    model_path: str,
    device: torch.device,
    *,
    use_ema: bool = True,
    raw_flags: Mapping | None = None,
    raw_preprocess: Callable[[], tuple[dict, int | None]] | None = None,
) -> DiffusionBundle:
    """Build the UNet and diffusion from ``model_path``, in eval mode on ``device``.

    :param use_ema: take the first EMA of our checkpoint when it has one.
    :param raw_flags: for a raw state dict: every ``unet_defaults()`` and
        ``diffusion_defaults()`` key (MODEL_FLAGS, DIFFUSION_FLAGS); unused for our checkpoints.
    :param raw_preprocess: for a raw state dict: returns the preprocessing dict
        (``Preprocess.to_dict()``) built from the data flags and its number of mask channels
        (``Preprocess.num_mask_channels``, None where the flags leave the classes to the data);
        called only for one.
    """
    if not model_path:
        raise ConfigError("--model_path is required (a diffusion checkpoint from train_addpm.py)")
    obj = load_raw_object(model_path)
    if is_raw_state_dict(obj):
        if raw_flags is None or raw_preprocess is None:
            raise ConfigError(f"{model_path} is a raw state dict: give the model flags to build it")
        model, diffusion, config, flags = _from_raw_state_dict(obj, model_path, raw_flags, *raw_preprocess())
        weights = "raw"
    else:
        ckpt = load_checkpoint(model_path, kind="diffusion")
        config = ckpt["config"]
        if "preprocess" not in config:
            raise CheckpointError(f"{model_path}: the checkpoint config records no preprocessing")
        model, diffusion = model_and_diffusion_from_config(config, source=model_path)
        state, weights = ckpt["model"], "model"
        if use_ema and ckpt["ema"]:
            rate = next(iter(ckpt["ema"]))
            state, weights = ckpt["ema"][rate], f"ema:{rate}"
        load_weights(model, state, model_path)
        flags = config["diffusion"]
    mask_space = flags.get("mask_space", "pm1")
    schedule = {
        "noise_schedule": flags["noise_schedule"],
        "diffusion_steps": int(flags["diffusion_steps"]),
        "mask_space": mask_space,
    }
    return DiffusionBundle(
        model=model.to(device).eval(),
        diffusion=diffusion,
        config=config,
        mask_space=mask_space,
        schedule=schedule,
        source=model_path,
        sha256=file_sha256(model_path),
        weights=weights,
    )


def _from_raw_state_dict(state, model_path: str, flags: Mapping, preprocess: dict, mask_channels: int | None):
    """A state dict of improved-diffusion's UNetModel, built with the user's flags and the
    ``mask_channels`` of their label flags (None: label flags that leave them to the data)."""
    if _FIRST_CONV not in state:
        raise CheckpointError(
            f"{model_path}: a state dict without {_FIRST_CONV}; it is not a UNet of the "
            "improved-diffusion family"
        )
    # The last convolution gives the mask channels (twice as many with --learn_sigma); the first
    # takes the image channels and the noisy mask. Both flags are checked against the weights,
    # since either one wrong would otherwise shift channels between image and mask.
    learn_sigma = str2bool(flags.get("learn_sigma", False))
    outputs = int(state[_LAST_CONV].shape[0]) if _LAST_CONV in state else 1
    per_channel = 2 if learn_sigma else 1
    if mask_channels is None:
        # Label flags that leave the values to the dataset (--label_mode multiclass alone): the
        # weights tell, and the nets' records are compared with the flags later.
        if outputs % per_channel:
            raise CheckpointError(f"{model_path}: the last convolution gives {outputs} channels, an odd "
                                  "number for --learn_sigma True (two outputs per mask channel)")
        mask_channels = outputs // per_channel
    expected = mask_channels * per_channel
    if outputs != expected:
        masks = f"{mask_channels} mask channel{'s' if mask_channels != 1 else ''}"
        raise CheckpointError(
            f"{model_path}: the last convolution gives {outputs} channels, but {masks} with --learn_sigma "
            f"{learn_sigma} need {expected}; check --learn_sigma and the label flags (one foreground by "
            "default; --classes or --regions for several)")
    image_channels = int(state[_FIRST_CONV].shape[1]) - mask_channels
    if image_channels < 1:
        raise CheckpointError(f"{model_path}: the first convolution takes {image_channels + mask_channels} "
                              f"channels, too few for {mask_channels} mask channel(s) and an image")
    image_size = int(preprocess["image_size"])
    model_flags = model_config(flags, image_channels=image_channels, mask_channels=mask_channels,
                               image_size=image_size)
    diffusion_flags = diffusion_config(flags)
    model = create_model(**model_flags)
    diffusion = create_gaussian_diffusion(**diffusion_flags)
    load_weights(model, state, model_path)
    config = {
        "image_size": image_size,
        "image_channels": image_channels,
        "mask_channels": mask_channels,
        "model": model_flags,
        "diffusion": diffusion_flags,
        "preprocess": dict(preprocess),
    }
    return model, diffusion, config, diffusion_flags
