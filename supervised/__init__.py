"""The supervised training engine of the pre-segmentation and the denoising nets.

``setup`` builds a run (folder, batches, optimizer, schedule, generators), ``step`` takes one
optimisation step, ``validation`` scores the Dice per mask channel, ``checkpointer`` saves and
resumes, ``engine.train`` drives them; ``options`` holds the flags of both trainers.
"""

from supervised.engine import TrainResult, train
from supervised.options import ENGINE_HELP, TrainOptions, engine_defaults
from supervised.setup import EpochBatchSampler, check_out_dir, seed_everything
from supervised.validation import evaluate_channel_dice, evaluate_dice, mask_dice

__all__ = [
    "ENGINE_HELP",
    "EpochBatchSampler",
    "TrainOptions",
    "TrainResult",
    "check_out_dir",
    "engine_defaults",
    "evaluate_channel_dice",
    "evaluate_dice",
    "mask_dice",
    "seed_everything",
    "train",
]
