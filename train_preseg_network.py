"""Train ADDPM's pre-segmentation network: image -> mask logits (CE + soft Dice).

The original ADDPM README's command runs as it is (with ``--data_dir``)::

    python train_preseg_network.py --data_dir DIR --batch_size 12 --lr 0.001

Any architecture of the registry (``--arch unet | attention_unet | unetpp | fcn_resnet50 |
deeplabv3_resnet50 | module:Class``). The patients of ``--data_dir`` are split into training
and validation (``--val_fraction``, ``--split_seed``); the validation Dice (per image) is
computed every epoch (or every ``--val_interval`` steps). Under ``--out_dir``
(default ``runs/preseg``): ``preseg_<step>.pt`` (newest ``--keep_checkpoints``), ``best.pt``
(best validation Dice), ``final.pt`` and the logs (progress.csv, progress.jsonl, log.txt).

Several classes (``--classes 1,2,4``: K + 1 softmax outputs, CE + soft Dice over the classes) or
overlapping regions (``--regions "WT:1,2,4;TC:1,4;ET:4"``: K sigmoids, BCE + soft Dice per
region): the validation logs ``val_dice_<name>`` per class or region (``class2``, ``WT``) and
their mean as ``val_dice``, by which ``best.pt`` is kept.
``--max_steps`` / ``--max_epoch`` (default 100 epochs) bound the run; ``--resume auto``
continues it. Several GPUs::

    torchrun --standalone --nproc_per_node 4 train_preseg_network.py --data_dir DIR ...

``sample.py`` reads ``runs/preseg/best.pt`` by default (``--preseg_path`` for another).
"""

from guided_diffusion import logger
from guided_diffusion.script_util import run_cli
from supervised.trainer import create_argparser as supervised_argparser
from supervised.trainer import train_from_flags


def create_argparser():
    return supervised_argparser("Train a pre-segmentation network for ADDPM.")


def image_and_label(batch, generator):
    """``batch_to_input_target`` of the pre-segmentation net: the image and its label."""
    return batch["image"], batch["label"]


def main(argv=None):
    args = create_argparser().parse_args(argv)
    logger.reset()
    train_from_flags(args, kind="preseg", batch_to_input_target=image_and_label)


if __name__ == "__main__":
    run_cli(main)
