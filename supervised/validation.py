"""Validation Dice of a supervised run: hard Dice per image of each mask channel (the whole
foreground, or each class or region), averaged over the validation items of all ranks (an empty
prediction of an empty label scores 1); the run's score is the mean over the channels.

The generator given to ``batch_to_input_target`` is seeded to the same value at every
validation, so that a noisy validation input (the denoiser's) is the same at every epoch and
the scores are comparable.
"""

import blobfile as bf
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data import collate
from guided_diffusion import logger
from guided_diffusion.dist_util import autocast_context
from guided_diffusion.run_dir import BEST_NAME
from guided_diffusion.mask_space import hard_channels, label_channels
from preseg.losses import channel_dice
from preseg.networks import mask_probabilities
from supervised.checkpointer import save
from supervised.setup import LOADER_STREAM, VALIDATION_STREAM, EpochBatchSampler, make_generator, stream_seed, to_device


def mask_dice(logits, label, exclusive=True):
    """Hard Dice per image and mask channel.

    :param logits: the net's logits: [B, K+1, H, W] for exclusive classes (K = 1: a binary
        mask), [B, K, H, W] for regions.
    :param label: the batch's label, [B, H, W] (one channel) or [B, K, H, W] {0,1}.
    :return: float32 [B, K]; 1 where a channel is empty in both prediction and label.
    """
    pred = hard_channels(mask_probabilities(logits, exclusive), exclusive) > 0
    return channel_dice(pred, label_channels(label) > 0)


@torch.no_grad()
def evaluate_channel_dice(model, dataset, batch_to_input_target, *, batch_size, device, exclusive=True,
                          precision="fp32", seed=0, num_workers=0, rank=0, world_size=1):
    """Mean Dice per mask channel of ``model`` on ``dataset`` (this rank's share, summed over ranks).

    :param model: network mapping ``input`` [B, Cin, H, W] to logits [B, K(+1), H, W].
    :param exclusive: the label mode's (``Preprocess.exclusive``): softmax classes or sigmoid regions.
    :return: list of K floats, the mean per-image Dice of each channel over the whole dataset.
    """
    device = torch.device(device)
    # Every item once: this rank's share in dataset order, without the padding of training.
    sampler = EpochBatchSampler(range(rank, len(dataset), world_size), batch_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(stream_seed(seed, LOADER_STREAM, rank)))
    generator = make_generator(device, stream_seed(seed, VALIDATION_STREAM, rank))
    was_training = model.training
    model.eval()
    sums, count = None, torch.zeros(1, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            batch = to_device(batch, device)
            inputs, target = batch_to_input_target(batch, generator)
            with autocast_context(device, precision):
                logits = model(inputs)
            scores = mask_dice(logits.float(), target, exclusive)
            sums = scores.double().sum(0) if sums is None else sums + scores.double().sum(0)
            count += scores.shape[0]
    finally:
        model.train(was_training)
    if sums is None:
        # This rank saw no item (more ranks than items): it still joins the sum.
        label = dataset[0]["label"] if len(dataset) else torch.zeros(1, 1)
        channels = label.shape[0] if label.dim() == 3 else 1
        sums = torch.zeros(channels, dtype=torch.float64, device=device)
    totals = torch.cat([sums, count])
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    count = totals[-1].item()
    return [value / count if count else float("nan") for value in totals[:-1].tolist()]


def evaluate_dice(model, dataset, batch_to_input_target, **kwargs):
    """The mean over the mask channels of ``evaluate_channel_dice`` (same arguments): the score
    by which a run keeps ``best.pt``."""
    return mean_score(evaluate_channel_dice(model, dataset, batch_to_input_target, **kwargs))


def mean_score(per_channel):
    """The mean of the per-channel scores (the one score of a single channel as it is)."""
    return per_channel[0] if len(per_channel) == 1 else sum(per_channel) / len(per_channel)


def validate(run):
    """Score the run's model on its validation set; keep ``best.pt`` on a new best, step the
    plateau schedule, log the score."""
    options, state = run.options, run.state
    per_channel = evaluate_channel_dice(
        run.model, run.val_set, run.batch_to_input_target, batch_size=options.batch_size,
        device=run.device, exclusive=run.preprocess.exclusive, precision=options.precision,
        seed=options.seed, num_workers=options.num_workers, rank=run.ctx.rank,
        world_size=run.ctx.world_size,
    )
    score = mean_score(per_channel)
    names = run.preprocess.class_names
    state.val_dice = score
    if len(per_channel) > 1:
        state.val_dice_by_channel = dict(zip(names, per_channel))
    state.validated_step = state.step
    improved = state.best_val_dice is None or score > state.best_val_dice
    if improved:
        state.best_val_dice, state.best_step = score, state.step
        save(run, bf.join(run.out_dir, BEST_NAME), training_state=False)
    if options.lr_schedule == "plateau":
        run.scheduler.step(score)
    logger.logkv("val_dice", score)
    for name, value in (state.val_dice_by_channel or {}).items():
        logger.logkv(f"val_dice_{name}", value)
    best = " (best)" if improved else f" (best {state.best_val_dice:.4f} at step {state.best_step})"
    each = ""
    if len(per_channel) > 1:
        each = " (" + ", ".join(f"{name} {value:.4f}" for name, value in zip(names, per_channel)) + "), mean"
    logger.log(f"step {state.step} (epoch {state.epoch}): validation Dice{each} {score:.4f}{best}")
