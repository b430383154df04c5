"""One optimisation step of a supervised run, and what it logs."""

import torch

from guided_diffusion import logger
from guided_diffusion.dist_util import autocast_context
from guided_diffusion.errors import AddpmError
from supervised.setup import to_device


def train_step(run, batch):
    """Forward, the run's loss (CE or BCE + soft Dice), backward, clipped update and the cosine
    schedule's step.

    :return: dict of the step's ``loss`` and ``terms`` (``{"ce" or "bce": float, "dice_loss":
        float}``), the ``lr`` it was taken with and the number of ``samples`` of this rank's batch.
    """
    options = run.options
    batch = to_device(batch, run.device)
    inputs, target = run.batch_to_input_target(batch, run.generator)
    with autocast_context(run.device, options.precision):
        logits = run.net(inputs)
    terms = run.loss_fn.components(logits, target)
    loss = run.loss_fn.weighted(terms)
    if not torch.isfinite(loss):
        raise AddpmError(
            f"training diverged: the loss is {loss.item()} at step {run.state.step}; lower --lr "
            "or use --precision fp32"
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if options.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), options.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    lr = run.optimizer.param_groups[0]["lr"]
    if options.lr_schedule == "cosine":
        run.scheduler.step()
    return {"loss": loss.item(), "terms": {key: value.item() for key, value in terms.items()},
            "lr": lr, "samples": inputs.shape[0]}


def log_step(stats):
    """The step's loss and its terms, averaged into the next dump."""
    logger.logkv_mean("loss", stats["loss"])
    for key, value in stats["terms"].items():
        logger.logkv_mean(key, value)


def dump_interval(run, lr, samples, seconds):
    """One row of the logs: where the run is, the lr, and the interval's samples per second."""
    state = run.state
    logger.logkv("step", state.step)
    logger.logkv("epoch", state.epoch)
    logger.logkv("samples", state.step * run.options.batch_size * run.ctx.world_size)
    logger.logkv("lr", lr)
    logger.logkv("samples_per_sec", samples / max(seconds, 1e-9))
    logger.dumpkvs()
