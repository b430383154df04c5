"""The command line that both supervised trainers share: flags -> data, network, engine.

``train_preseg_network.py`` and ``train_denoising_network.py`` differ only in their extra
flags, the network's input channels, what the checkpoint records besides the network, and
``batch_to_input_target``.
"""

import argparse

from data import DATA_HELP, data_defaults, dataset_from_args
from guided_diffusion import dist_util
from guided_diffusion.script_util import add_dict_to_argparser
from preseg.io import NETWORK_HELP, args_record, build_network_from_config, network_config, network_defaults
from preseg.networks import init_region_head
from supervised.engine import train
from supervised.options import ENGINE_HELP, TrainOptions, engine_defaults
from supervised.setup import check_out_dir, seed_everything


def create_argparser(description, extra_defaults=None, extra_help=None):
    """The data, network and engine flags, plus a trainer's own."""
    defaults = {**data_defaults(), **network_defaults(), **engine_defaults(), **(extra_defaults or {})}
    parser = argparse.ArgumentParser(description=description)
    add_dict_to_argparser(parser, defaults, {**DATA_HELP, **NETWORK_HELP, **ENGINE_HELP, **(extra_help or {})})
    return parser


def train_from_flags(args, *, kind, batch_to_input_target, in_channels=None, record=None):
    """Check the flags and the out_dir, read the patient split, build the network, train it.

    :param kind: "preseg" or "denoiser".
    :param in_channels: ``f(image channels, mask channels K) -> the network's input channels``
        (None: the image's).
    :param record: ``f(train_set) -> dict`` of what the checkpoint config records besides the
        network, the preprocessing and the flags (None: nothing).
    :return: the engine's ``TrainResult``.
    """
    options = TrainOptions.from_args(args)
    options.check()
    check_out_dir(options, kind)  # before the data is read: a folder that cannot take the run
    ctx = dist_util.setup_dist(args.device)
    try:
        train_set = dataset_from_args(args, subset="train", require_labels=True)
        # --val_fraction 0: every patient trains, and nothing is validated (no best.pt).
        val_set = (dataset_from_args(args, subset="val", require_labels=True)
                   if args.val_fraction > 0 else None)
        channels, preprocess = train_set.num_channels, train_set.preprocess
        if in_channels:
            channels = in_channels(channels, preprocess.num_mask_channels)
        # K + 1 softmax logits for classes (2 for one foreground), K sigmoids for regions.
        config = network_config(args, in_channels=channels, num_classes=preprocess.network_classes)
        config.update(record(train_set) if record else {})
        config.update(preprocess=preprocess.to_dict(), args=args_record(args))
        seed_everything(args.seed)
        model = build_network_from_config(config)
        if not preprocess.exclusive:
            init_region_head(model)
        return train(kind=kind, model=model, config=config, train_set=train_set, val_set=val_set,
                     batch_to_input_target=batch_to_input_target, options=options, ctx=ctx)
    finally:
        dist_util.cleanup()
