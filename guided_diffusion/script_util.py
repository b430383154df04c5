"""Flags and factories shared by the scripts: defaults per component, argparse, model + diffusion.

Each component has a dict of defaults (``unet_defaults``, ``diffusion_defaults``,
``training_defaults``) with improved-diffusion's flag names; a script merges the dicts it
needs (plus ``data.data_defaults()``, which holds ``--image_size``) and turns them into flags
with ``add_dict_to_argparser``. Every flag has a help string in ``HELP``.

Building from Python::

    from guided_diffusion.script_util import (
        create_model_and_diffusion, diffusion_defaults, unet_defaults,
    )
    flags = {**unet_defaults(), **diffusion_defaults(), "num_channels": 32}
    model, diffusion = create_model_and_diffusion(image_size=64, image_channels=4, **flags)

Checkpoints record ``model_config(args, ...)`` and ``diffusion_config(args)``; the models are
rebuilt with ``create_model(**config["model"])`` and
``create_gaussian_diffusion(**config["diffusion"])``.
"""

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tqdm import tqdm

from guided_diffusion.errors import AddpmError, CheckpointError, ConfigError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from guided_diffusion.mask_space import MASK_SPACES
from guided_diffusion.unet import UNetModel, parse_attention_resolutions, parse_channel_mult

HELP = {
    # UNet
    "num_channels": "base width of the UNet (model_channels); --channel_mult scales it per level",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads per attention layer (used when --num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the decoder's attention layers; -1 = --num_heads",
    "num_head_channels": "channels per attention head, overriding --num_heads; -1 = off",
    "attention_resolutions": (
        "comma-separated feature-map sizes (e.g. 16,8) at which the UNet uses self-attention, "
        "as in improved-diffusion; empty = only the middle block attends"
    ),
    "channel_mult": (
        "comma-separated width multipliers per level (e.g. 1,1,2,2,4,4); each level but the "
        "last halves the resolution; empty = a default by --image_size as guided-diffusion's"
    ),
    "dropout": "dropout probability inside the residual blocks",
    "class_cond": "accepted for compatibility; only False is supported",
    "learn_sigma": (
        "also learn the reverse-process variance (output channels doubled, hybrid loss with "
        "the variational bound), as improved-diffusion"
    ),
    "use_checkpoint": "gradient checkpointing: recompute activations in the backward pass to save memory",
    "use_scale_shift_norm": (
        "condition the residual blocks on the timestep by scale and shift of the normalized "
        "features (norm(h) * (1 + scale) + shift) instead of adding the embedding"
    ),
    "resblock_updown": "down- and upsample inside residual blocks instead of separate layers",
    "use_new_attention_order": (
        "split q, k, v before the heads (guided-diffusion's QKVAttention) instead of after "
        "(improved-diffusion's order)"
    ),
    # Diffusion
    "diffusion_steps": "number of steps N of the diffusion chain the model is trained on",
    "noise_schedule": (
        "beta schedule: cosine (Nichol & Dhariwal 2021; the default here, as in ADDPM's flags and "
        "the denoiser's default) or linear (improved-diffusion's default, scaled to N)"
    ),
    "sigma_small": (
        "with a fixed variance, use the posterior variance (beta tilde) instead of beta "
        "(ignored when --learn_sigma)"
    ),
    "timestep_respacing": (
        "sampling-time option of sample.py --sampler ddpm|ddim: the levels kept from the chain, "
        "as improved-diffusion's strings ('250', 'ddim50', '10,10,10'); empty = every step (or "
        "--sampling_steps); training always uses the full chain"
    ),
    "rescale_timesteps": "feed the model t * 1000 / N instead of t, as improved-diffusion does",
    "rescale_learned_sigmas": (
        "with --learn_sigma, scale the variational-bound term of the loss by N / 1000, as "
        "improved-diffusion's RESCALED_MSE"
    ),
    "predict_xstart": (
        "the UNet predicts the clean mask x0 instead of the noise eps (improved-diffusion's "
        "flag); recommended with --train_start preseg"
    ),
    "mask_space": (
        "pm1: masks live in {-1,+1} (default); 01: {0,1}, for models trained by the older "
        "improved-diffusion-based segmentation code"
    ),
    # Training
    "lr": "learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "batch_size": "images per optimizer step (per process under torchrun)",
    "microbatch": "split each batch into chunks of this size and accumulate the gradients; -1 = no split",
    "ema_rate": (
        "comma-separated EMA decay rates; one EMA copy of the weights is kept per rate, "
        "with a warm-up (the rate after n steps is min(rate, (1 + n) / (10 + n))) so that short "
        "runs do not sample from nearly the initial weights"
    ),
    "log_interval": "log the means of the losses every this many steps",
    "save_interval": "save a checkpoint every this many steps",
    "resume_checkpoint": (
        "checkpoint to resume from (weights, EMA, optimizer state and step); "
        "'auto' = the newest checkpoint in the output folder; empty = start fresh"
    ),
    "use_fp16": "same as --precision fp16",
    "precision": (
        "fp32, bf16 (CPU or CUDA) or fp16 (CUDA only, with a gradient scaler); mixed precision "
        "by torch.autocast"
    ),
    "schedule_sampler": (
        "timestep sampler: uniform or loss-second-moment (improved-diffusion's importance sampling)"
    ),
    "lr_anneal_steps": (
        "improved-diffusion's: anneal lr linearly to 0 over this many steps and end the run "
        "there (0 = off)"
    ),
    "grad_clip": "clip the gradient norm to this value; 0 = off",
    "seed": "random seed for the weights, the data order and the noise",
    "device": "auto, cpu, cuda, cuda:N or mps; auto = CUDA if available, else MPS, else CPU",
    "max_steps": "stop after this many optimizer steps; 0 = no limit",
}

def unet_defaults() -> dict:
    """Defaults of the UNet flags (improved-diffusion's names; ``--image_size`` is a data flag)."""
    return dict(
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        learn_sigma=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_new_attention_order=False,
    )


def diffusion_defaults() -> dict:
    """Defaults of the diffusion-process flags."""
    return dict(
        diffusion_steps=1000,
        noise_schedule="cosine",
        sigma_small=False,
        timestep_respacing="",
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        predict_xstart=False,
        mask_space="pm1",
    )


def training_defaults() -> dict:
    """Defaults of the training-loop flags shared by the trainers."""
    return dict(
        lr=1e-4,
        weight_decay=0.0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        precision="fp32",
        schedule_sampler="uniform",
        lr_anneal_steps=0,
        grad_clip=1.0,
        seed=0,
        device="auto",
        max_steps=0,
    )


def str2bool(value) -> bool:
    """argparse type for boolean flags: ``--learn_sigma False`` as improved-diffusion's scripts.

    Accepts true/false, yes/no, t/f, y/n, 1/0 in any case; anything else is an argparse error
    that names the value.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "t", "y", "1"):
        return True
    if text in ("false", "no", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, yes/no, 1/0), got {value!r}")


def add_dict_to_argparser(
    parser: argparse.ArgumentParser, defaults: Mapping[str, Any], helps: Mapping[str, str]
) -> None:
    """Add one ``--key`` flag per entry of ``defaults``, typed by its default value.

    bool defaults parse with ``str2bool`` (``--flag False``, as improved-diffusion); ``None``
    defaults parse as str. Every key must have a help string in ``helps``: a missing one is a
    programming error and raises ValueError when the parser is built, not when a user asks
    for ``--help``.
    """
    missing = [key for key in defaults if not helps.get(key)]
    if missing:
        raise ValueError(f"flags without a help string: {', '.join(missing)}")
    for key, value in defaults.items():
        if isinstance(value, bool):
            value_type = str2bool
        elif value is None:
            value_type = str
        else:
            value_type = type(value)
        # argparse %-formats help strings, so a literal % must be doubled.
        text = helps[key].replace("%", "%%") + " (default: %(default)r)"
        parser.add_argument(f"--{key}", default=value, type=value_type, help=text)


def args_to_dict(args, keys: Iterable[str]) -> dict:
    """Pick ``keys`` from an argparse Namespace (or a mapping) into a new dict."""
    source = args if isinstance(args, Mapping) else vars(args)
    return {key: source[key] for key in keys}


def model_config(
    args, *, image_channels: int, mask_channels: int = 1, image_size: int | None = None
) -> dict:
    """Everything ``create_model`` takes, from flat flags: what a checkpoint records.

    :param args: argparse Namespace or mapping holding every ``unet_defaults()`` key and,
        unless ``image_size`` is given, ``image_size``.
    :param image_channels: channels of the input images (from the data, never a flag).
    :return: plain dict; ``create_model(**model_config(...))`` rebuilds the model.
    """
    config = args_to_dict(args, unet_defaults().keys())
    if image_size is None:
        image_size = args_to_dict(args, ["image_size"])["image_size"]
    return dict(
        image_size=int(image_size),
        image_channels=int(image_channels),
        mask_channels=int(mask_channels),
        **config,
    )


def diffusion_config(args) -> dict:
    """Everything ``create_gaussian_diffusion`` takes, from flat flags (incl. ``learn_sigma``).

    :return: plain dict; ``create_gaussian_diffusion(**diffusion_config(args))`` rebuilds it.
    """
    return args_to_dict(args, [*diffusion_defaults().keys(), "learn_sigma"])


def create_model(
    *,
    image_size: int,
    image_channels: int,
    mask_channels: int = 1,
    num_channels: int,
    num_res_blocks: int,
    num_heads: int,
    num_heads_upsample: int,
    num_head_channels: int,
    attention_resolutions: str,
    channel_mult: str,
    dropout: float,
    class_cond: bool,
    learn_sigma: bool,
    use_checkpoint: bool,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
) -> UNetModel:
    """The conditional segmentation UNet: input [B, C+M, S, S] (image first), output [B, M*(1|2), S, S].

    :param image_size: side S of the (square) preprocessed images.
    :param image_channels: C, channels of the conditioning image.
    :param mask_channels: M, channels of the noisy mask (1 for binary segmentation).
    :param learn_sigma: doubles the output channels (eps, then the variance interpolation).
    Other keywords are the UNet flags (see ``HELP``); all are required, so that a config
    recorded in a checkpoint rebuilds exactly its model (``create_model_and_diffusion`` fills
    in the defaults).
    """
    if class_cond:
        raise ConfigError(
            "--class_cond True is not supported: segmentation models here are conditioned on "
            "the image only"
        )
    if image_channels < 1 or mask_channels < 1:
        raise ConfigError(
            f"the model needs at least one image and one mask channel, got "
            f"image_channels={image_channels}, mask_channels={mask_channels}"
        )
    return UNetModel(
        image_size=image_size,
        in_channels=image_channels + mask_channels,
        model_channels=num_channels,
        out_channels=mask_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_gaussian_diffusion(
    *,
    diffusion_steps: int,
    noise_schedule: str,
    learn_sigma: bool,
    sigma_small: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    timestep_respacing: str = "",
    mask_space: str = "pm1",
    predict_xstart: bool = False,
) -> GaussianDiffusion:
    """The diffusion process of the full training chain (N = ``diffusion_steps`` steps).

    ``timestep_respacing`` is a sampling-time option: the reverse loop walks a list of
    timesteps of this full chain (``respace.full_chain_timesteps``), so the respacing does not
    change the object built here; it is accepted so that a whole ``diffusion_config`` can be
    passed. ``mask_space`` is checked here (so a bad value fails before training starts) and
    is applied by ``mask_space.to_diffusion_space`` / ``to_probability``.
    """
    if mask_space not in MASK_SPACES:
        raise ConfigError(
            f"--mask_space: unknown value {mask_space!r} (choose one of {', '.join(MASK_SPACES)})"
        )
    if isinstance(diffusion_steps, bool) or not isinstance(diffusion_steps, int) or diffusion_steps < 1:
        raise ConfigError(f"--diffusion_steps must be a positive integer, got {diffusion_steps!r}")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    return GaussianDiffusion(
        betas=betas,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        predict_xstart=predict_xstart,
    )


def create_model_and_diffusion(
    *, image_size: int, image_channels: int, mask_channels: int = 1, **flags
) -> tuple[UNetModel, GaussianDiffusion]:
    """Build the UNet and the diffusion from one flat dict of UNet and diffusion flags.

    ``flags`` may hold any subset of ``unet_defaults()`` and ``diffusion_defaults()`` keys
    (missing ones take their defaults); any other key is a TypeError, so a misspelt flag
    cannot be silently dropped.
    """
    unet_keys = unet_defaults().keys()
    diffusion_keys = diffusion_defaults().keys()
    unknown = [key for key in flags if key not in unet_keys and key not in diffusion_keys]
    if unknown:
        raise TypeError(f"create_model_and_diffusion got unknown flags: {', '.join(unknown)}")
    unet_flags = {**unet_defaults(), **{k: v for k, v in flags.items() if k in unet_keys}}
    diffusion_flags = {
        **diffusion_defaults(),
        **{k: v for k, v in flags.items() if k in diffusion_keys},
    }
    model = create_model(
        image_size=image_size,
        image_channels=image_channels,
        mask_channels=mask_channels,
        **unet_flags,
    )
    diffusion = create_gaussian_diffusion(learn_sigma=unet_flags["learn_sigma"], **diffusion_flags)
    return model, diffusion


def close_progress_bars() -> None:
    """Close every open tqdm bar now, so that no bar redraws itself after an error line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(main: Callable[[], Any]) -> Any:
    """Run a script's ``main()``: a user error becomes one line on stderr and exit code 2.

    ``AddpmError`` -> ``error: <message>`` on stderr, ``SystemExit(2)``, no traceback (the
    message already names the file or flag); progress bars still open are closed first, so
    the error is the last line. Ctrl-C -> exit code 130 without a traceback.
    Any other exception is a bug and keeps its traceback.
    """
    try:
        return main()
    except AddpmError as err:
        close_progress_bars()
        message = " ".join(str(err).split("\n")).strip() or type(err).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        close_progress_bars()
        raise SystemExit(130) from None


# ---------------------------------------------------------------------------------------------
# Diffusion checkpoints (kind "diffusion", written by train_addpm.py, read by sample.py)


def diffusion_checkpoint_config(flags: Mapping, *, image_channels: int, preprocess: Mapping,
                                mask_channels: int = 1) -> dict:
    """The ``config`` of a diffusion checkpoint: what rebuilds the UNet, the diffusion and the preprocessing.

    :param flags: every parsed flag by name, holding every ``unet_defaults()`` and
        ``diffusion_defaults()`` key and ``image_size``.
    :param image_channels: channels of the training images (from the dataset).
    :param preprocess: ``Preprocess.to_dict()`` of the training data.
    :return: ``{"image_size", "image_channels", "mask_channels", "model": {UNet flags},
        "diffusion": {diffusion flags}, "preprocess": {...}, "args": {every flag}}``, plain types.
    """
    flags = dict(flags)
    return {
        "image_size": int(flags["image_size"]),
        "image_channels": int(image_channels),
        "mask_channels": int(mask_channels),
        "model": args_to_dict(flags, unet_defaults().keys()),
        "diffusion": args_to_dict(flags, diffusion_defaults().keys()),
        "preprocess": dict(preprocess),
        "args": flags,
    }


def model_and_diffusion_from_config(config: Mapping, source: str = "checkpoint") -> tuple[UNetModel, GaussianDiffusion]:
    """Rebuild the UNet and the diffusion recorded in a diffusion checkpoint's ``config``.

    Accepts the layout of ``diffusion_checkpoint_config`` (image_size / image_channels /
    mask_channels at the top) and a ``model`` section that holds them itself (as
    ``model_config`` writes). Flags missing from the config take their current defaults.

    :param source: the checkpoint's path, named in error messages.
    :raises CheckpointError: a config without the needed entries or with flags this code
        does not know (e.g. a checkpoint of a newer version).
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise CheckpointError(f"{source}: the checkpoint config has no 'model' section")
    model_flags = dict(config["model"])
    diffusion_flags = dict(config.get("diffusion") or {})
    sizes = {}
    for key in ("image_size", "image_channels", "mask_channels"):
        value = model_flags.pop(key, config.get(key))
        if value is None and key == "mask_channels":
            value = 1
        if value is None:
            raise CheckpointError(f"{source}: the checkpoint config does not record {key}")
        sizes[key] = int(value)
    # diffusion_config() records learn_sigma with the diffusion; it is a UNet flag here.
    learn_sigma = diffusion_flags.pop("learn_sigma", None)
    if learn_sigma is not None and learn_sigma != model_flags.setdefault("learn_sigma", learn_sigma):
        raise CheckpointError(f"{source}: the checkpoint config disagrees with itself on learn_sigma")
    unknown = sorted(
        [k for k in model_flags if k not in unet_defaults()]
        + [k for k in diffusion_flags if k not in diffusion_defaults()]
    )
    if unknown:
        raise CheckpointError(
            f"{source}: the checkpoint config has flags this code does not know ({', '.join(unknown)}); "
            f"was it written by a newer version?"
        )
    return create_model_and_diffusion(**sizes, **model_flags, **diffusion_flags)
