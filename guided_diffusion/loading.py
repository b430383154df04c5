"""Load the conditional diffusion UNet for sampling: our checkpoint, or a raw state dict.

A checkpoint written by ``train_addpm.py`` rebuilds itself from its config. A raw
``{name: tensor}`` state dict (``savedmodel.pt`` of improved-diffusion-based segmentation
code) is built from the flags the user gives (MODEL_FLAGS, DIFFUSION_FLAGS, --image_size);
its image channel count is read off the first convolution.
"""

import hashlib
from dataclasses import dataclass

import torch

from guided_diffusion.checkpoint import is_raw_state_dict, load_checkpoint, load_raw_object, load_weights
from guided_diffusion.errors import CheckpointError, ConfigError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    create_model,
    diffusion_config,
    model_and_diffusion_from_config,
    model_config,
)

_FIRST_CONV = "input_blocks.0.0.weight"


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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_diffusion_model(args, device: torch.device) -> DiffusionBundle:
    """Build the UNet and diffusion from ``args.model_path``, in eval mode on ``device``.

    args: parsed sample.py flags (model_path, use_ema, and the unet / diffusion / data flags
    that a raw state dict needs).
    """
    if not args.model_path:
        raise ConfigError("--model_path is required (a diffusion checkpoint from train_addpm.py)")
    obj = load_raw_object(args.model_path)
    if is_raw_state_dict(obj):
        model, diffusion, config, flags = _from_raw_state_dict(obj, args)
        weights = "raw"
    else:
        ckpt = load_checkpoint(args.model_path, kind="diffusion")
        config = ckpt["config"]
        if "preprocess" not in config:
            raise CheckpointError(f"{args.model_path}: the checkpoint config records no preprocessing")
        model, diffusion = model_and_diffusion_from_config(config, source=args.model_path)
        state, weights = ckpt["model"], "model"
        if args.use_ema and ckpt["ema"]:
            rate = next(iter(ckpt["ema"]))
            state, weights = ckpt["ema"][rate], f"ema:{rate}"
        load_weights(model, state, args.model_path)
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
        source=args.model_path,
        sha256=file_sha256(args.model_path),
        weights=weights,
    )


def _from_raw_state_dict(state, args):
    """A state dict of improved-diffusion's UNetModel, built with the user's flags."""
    if _FIRST_CONV not in state:
        raise CheckpointError(
            f"{args.model_path}: a state dict without {_FIRST_CONV}; it is not a UNet of the "
            "improved-diffusion family"
        )
    mask_channels = 1
    image_channels = int(state[_FIRST_CONV].shape[1]) - mask_channels
    if image_channels < 1:
        raise CheckpointError(f"{args.model_path}: the first convolution takes {image_channels + 1} channels")
    model_flags = model_config(args, image_channels=image_channels, mask_channels=mask_channels)
    diffusion_flags = diffusion_config(args)
    model = create_model(**model_flags)
    diffusion = create_gaussian_diffusion(**diffusion_flags)
    load_weights(model, state, args.model_path)
    preprocess = {
        "image_size": int(args.image_size),
        "resize_mode": args.resize_mode,
        "label_mode": args.label_mode,
        "foreground_labels": [int(v) for v in str(args.foreground_labels).split(",") if v.strip()],
    }
    config = {
        "image_size": int(args.image_size),
        "image_channels": image_channels,
        "mask_channels": mask_channels,
        "model": model_flags,
        "diffusion": diffusion_flags,
        "preprocess": preprocess,
    }
    return model, diffusion, config, diffusion_flags
