"""Train ADDPM's one-step denoising network: a mask noised to level T -> the clean mask.

The original ADDPM README's command runs as it is (with ``--data_dir``)::

    python train_denoising_network.py --data_dir DIR --batch_size 12 --lr 0.001 --T 250

Each batch noises its labels to level ``--T`` by the forward rule of the diffusion model
(``--noise_schedule``, ``--diffusion_steps``, ``--mask_space``: keep them equal to those of
``train_addpm.py``; the defaults are the original README's), with fresh noise every batch; the
net (any ``--arch`` of the pre-segmentation registry) sees the noisy mask alone
(``--denoiser_cond none``, as ADDPM) or with the image (``image``) and is trained with CE +
soft Dice against the clean label. With ``--classes`` or ``--regions`` the mask has one channel
per class or region and the net outputs K + 1 softmax logits (classes) or K sigmoids (regions),
with the pre-segmentation's losses and its validation Dice per class. Validation: Dice at level
T with the same noise at every epoch. The other flags of train_addpm.py's ``$DIFFUSION_FLAGS``
(``--rescale_learned_sigmas``, ``--rescale_timesteps``, ``--sigma_small``,
``--timestep_respacing``, ``--predict_xstart``) are accepted, so one shell variable serves both
trainers, and recorded in the checkpoint as ignored.
Outputs under ``--out_dir`` (default ``runs/denoiser``) as ``train_preseg_network.py``'s
(``denoiser_<step>.pt``, ``best.pt``, ``final.pt``, logs); ``sample.py`` reads
``runs/denoiser/best.pt`` by default and refuses it unless its ``--T`` and the diffusion
model's schedule match.
"""

from denoiser.model import (
    DENOISER_HELP,
    IGNORED_HELP,
    NoisyMaskBatch,
    check_denoiser_settings,
    denoiser_defaults,
    denoiser_in_channels,
    ignored_diffusion_defaults,
)
from guided_diffusion import logger
from guided_diffusion.script_util import run_cli
from supervised.trainer import create_argparser as supervised_argparser
from supervised.trainer import train_from_flags


def create_argparser():
    return supervised_argparser("Train the one-step denoising network of ADDPM.",
                                {**denoiser_defaults(), **ignored_diffusion_defaults()},
                                {**DENOISER_HELP, **IGNORED_HELP})


def main(argv=None):
    args = create_argparser().parse_args(argv)
    logger.reset()
    schedule = {key: getattr(args, key) for key in denoiser_defaults()}
    check_denoiser_settings(**schedule)
    ignored = {key: getattr(args, key) for key in ignored_diffusion_defaults()}

    def record(train_set):
        # Logged once the data is read, with the run's other opening lines.
        logger.log("ignored (they do not concern the denoising net): "
                   + ", ".join(f"--{key} {value}" for key, value in ignored.items()))
        return {**schedule, "image_channels": train_set.num_channels, "ignored_flags": ignored}

    train_from_flags(args, kind="denoiser", batch_to_input_target=NoisyMaskBatch(**schedule),
                     in_channels=lambda channels, mask_channels: denoiser_in_channels(
                         channels, args.denoiser_cond, mask_channels),
                     record=record)


if __name__ == "__main__":
    run_cli(main)
