"""Train ADDPM's one-step denoising network: a mask noised to level T -> the clean mask.

The original ADDPM README's command runs as it is (with ``--data_dir``)::

    python train_denoising_network.py --data_dir DIR --batch_size 12 --lr 0.001 --T 250

Each batch noises its labels to level ``--T`` by the forward rule of the diffusion model
(``--noise_schedule``, ``--diffusion_steps``, ``--mask_space``: keep them equal to those of
``train_addpm.py``; the defaults are the original README's), with fresh noise every batch; the
net (any ``--arch`` of the pre-segmentation registry) sees the noisy mask alone
(``--denoiser_cond none``, as ADDPM) or with the image (``image``) and is trained with CE +
soft Dice against the clean label. Validation: Dice at level T with the same noise at every
epoch. The other flags of train_addpm.py's ``$DIFFUSION_FLAGS`` (``--rescale_learned_sigmas``,
``--rescale_timesteps``, ``--sigma_small``, ``--timestep_respacing``, ``--predict_xstart``) are
accepted, so one shell variable serves both trainers, and recorded in the checkpoint as ignored.
Outputs under ``--out_dir`` (default ``runs/denoiser``) as ``train_preseg_network.py``'s
(``denoiser_<step>.pt``, ``best.pt``, ``final.pt``, logs); ``sample.py`` reads
``runs/denoiser/best.pt`` by default and refuses it unless its ``--T`` and the diffusion
model's schedule match.
"""

import argparse

from data import DATA_HELP, data_defaults, dataset_from_args
from denoiser.model import (
    DENOISER_HELP,
    IGNORED_HELP,
    NoisyMaskBatch,
    check_denoiser_settings,
    denoiser_defaults,
    denoiser_in_channels,
    ignored_diffusion_defaults,
)
from guided_diffusion import dist_util, logger
from guided_diffusion.script_util import add_dict_to_argparser, run_cli
from preseg.io import (
    NETWORK_HELP,
    args_record,
    build_network_from_config,
    network_config,
    network_defaults,
)
from supervised import ENGINE_HELP, TrainOptions, check_out_dir, engine_defaults, seed_everything, train


def create_argparser():
    defaults = {**data_defaults(), **network_defaults(), **engine_defaults(), **denoiser_defaults(),
                **ignored_diffusion_defaults()}
    helps = {**DATA_HELP, **NETWORK_HELP, **ENGINE_HELP, **DENOISER_HELP, **IGNORED_HELP}
    parser = argparse.ArgumentParser(description="Train the one-step denoising network of ADDPM.")
    add_dict_to_argparser(parser, defaults, helps)
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    logger.reset()
    schedule = {key: getattr(args, key) for key in denoiser_defaults()}
    check_denoiser_settings(**schedule)
    options = TrainOptions.from_args(args)
    options.check()
    check_out_dir(options, "denoiser")  # before the data is read: a folder that cannot take the run
    ctx = dist_util.setup_dist(args.device)
    try:
        train_set = dataset_from_args(args, subset="train", require_labels=True)
        # --val_fraction 0: every patient trains, and nothing is validated (no best.pt).
        val_set = (dataset_from_args(args, subset="val", require_labels=True)
                   if args.val_fraction > 0 else None)
        in_channels = denoiser_in_channels(train_set.num_channels, args.denoiser_cond)
        config = network_config(args, in_channels=in_channels)
        ignored = {key: getattr(args, key) for key in ignored_diffusion_defaults()}
        config.update(schedule, image_channels=train_set.num_channels, ignored_flags=ignored,
                      preprocess=train_set.preprocess.to_dict(), args=args_record(args))
        logger.log("ignored (they do not concern the denoising net): "
                   + ", ".join(f"--{key} {value}" for key, value in ignored.items()))
        seed_everything(args.seed)
        model = build_network_from_config(config)
        train(kind="denoiser", model=model, config=config, train_set=train_set, val_set=val_set,
              batch_to_input_target=NoisyMaskBatch(**schedule), options=options, ctx=ctx)
    finally:
        dist_util.cleanup()


if __name__ == "__main__":
    run_cli(main)
