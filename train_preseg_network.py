"""Train ADDPM's pre-segmentation network: image -> mask logits (CE + soft Dice).

The original ADDPM README's command runs as it is (with ``--data_dir``)::

    python train_preseg_network.py --data_dir DIR --batch_size 12 --lr 0.001

Any architecture of the registry (``--arch unet | attention_unet | unetpp | fcn_resnet50 |
deeplabv3_resnet50 | module:Class``). The patients of ``--data_dir`` are split into training
and validation (``--val_fraction``, ``--split_seed``); the validation Dice (whole foreground,
per image) is computed every epoch (or every ``--val_interval`` steps). Under ``--out_dir``
(default ``runs/preseg``): ``preseg_<step>.pt`` (newest ``--keep_checkpoints``), ``best.pt``
(best validation Dice), ``final.pt`` and the logs (progress.csv, progress.jsonl, log.txt).
``--max_steps`` / ``--max_epoch`` (default 100 epochs) bound the run; ``--resume auto``
continues it. Several GPUs::

    torchrun --standalone --nproc_per_node 4 train_preseg_network.py --data_dir DIR ...

``sample.py`` reads ``runs/preseg/best.pt`` by default (``--preseg_path`` for another).
"""

import argparse

from data import DATA_HELP, data_defaults, dataset_from_args
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
    defaults = {**data_defaults(), **network_defaults(), **engine_defaults()}
    parser = argparse.ArgumentParser(description="Train a pre-segmentation network for ADDPM.")
    add_dict_to_argparser(parser, defaults, {**DATA_HELP, **NETWORK_HELP, **ENGINE_HELP})
    return parser


def image_and_label(batch, generator):
    """``batch_to_input_target`` of the pre-segmentation net: the image and its label."""
    return batch["image"], batch["label"]


def main(argv=None):
    args = create_argparser().parse_args(argv)
    logger.reset()
    options = TrainOptions.from_args(args)
    options.check()
    check_out_dir(options, "preseg")  # before the data is read: a folder that cannot take the run
    ctx = dist_util.setup_dist(args.device)
    try:
        train_set = dataset_from_args(args, subset="train", require_labels=True)
        # --val_fraction 0: every patient trains, and nothing is validated (no best.pt).
        val_set = (dataset_from_args(args, subset="val", require_labels=True)
                   if args.val_fraction > 0 else None)
        config = network_config(args, in_channels=train_set.num_channels)
        config.update(preprocess=train_set.preprocess.to_dict(), args=args_record(args))
        seed_everything(args.seed)
        model = build_network_from_config(config)
        train(kind="preseg", model=model, config=config, train_set=train_set, val_set=val_set,
              batch_to_input_target=image_and_label, options=options, ctx=ctx)
    finally:
        dist_util.cleanup()


if __name__ == "__main__":
    run_cli(main)
