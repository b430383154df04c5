"""Validation Dice of a supervised run: hard Dice of the whole foreground per image, averaged
over the validation items of all ranks (an empty prediction of an empty label scores 1).

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
from preseg.losses import dice_per_image
from supervised.checkpointer import save
from supervised.setup import LOADER_STREAM, VALIDATION_STREAM, EpochBatchSampler, make_generator, stream_seed, to_device


def foreground_dice(logits, target):
    """Hard Dice of the whole foreground per image.

    :param logits: [B, K, H, W] class logits.
    :param target: [B, H, W] int64 labels (0 = background).
    :return: float32 [B]: Dice of (argmax > 0) vs (target > 0); 1 where both are empty.
    """
    pred = (logits.argmax(dim=1) > 0).long()
    return dice_per_image(pred, (target > 0).long(), num_classes=2)[:, 0]


@torch.no_grad()
def evaluate_dice(model, dataset, batch_to_input_target, *, batch_size, device, precision="fp32",
                  seed=0, num_workers=0, rank=0, world_size=1):
    """Mean foreground Dice of ``model`` on ``dataset`` (this rank's share, summed over ranks).

    :param model: network mapping ``input`` [B, Cin, H, W] to logits [B, K, H, W].
    :return: float, the mean per-image Dice over the whole dataset (all ranks).
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
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            batch = to_device(batch, device)
            inputs, target = batch_to_input_target(batch, generator)
            with autocast_context(device, precision):
                logits = model(inputs)
            scores = foreground_dice(logits.float(), target)
            totals[0] += scores.double().sum()
            totals[1] += scores.numel()
    finally:
        model.train(was_training)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    count = totals[1].item()
    return totals[0].item() / count if count else float("nan")


def validate(run):
    """Score the run's model on its validation set; keep ``best.pt`` on a new best, step the
    plateau schedule, log the score."""
    options, state = run.options, run.state
    score = evaluate_dice(
        run.model, run.val_set, run.batch_to_input_target, batch_size=options.batch_size,
        device=run.device, precision=options.precision, seed=options.seed,
        num_workers=options.num_workers, rank=run.ctx.rank, world_size=run.ctx.world_size,
    )
    state.val_dice = score
    state.validated_step = state.step
    improved = state.best_val_dice is None or score > state.best_val_dice
    if improved:
        state.best_val_dice, state.best_step = score, state.step
        save(run, bf.join(run.out_dir, BEST_NAME), training_state=False)
    if options.lr_schedule == "plateau":
        run.scheduler.step(score)
    logger.logkv("val_dice", score)
    best = " (best)" if improved else f" (best {state.best_val_dice:.4f} at step {state.best_step})"
    logger.log(f"step {state.step} (epoch {state.epoch}): validation Dice {score:.4f}{best}")
