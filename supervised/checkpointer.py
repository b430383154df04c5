"""Checkpoints of a supervised run: what a save holds and how a resume restores it.

A training-state checkpoint (``<kind>_<step>.pt``, ``final.pt``) holds the model, optimizer,
lr schedule, gradient scaler, step, epoch (and the position inside it), best score and every
rank's random number generators, so that 2 + 2 steps give the same weights as 4 (bit for bit,
in one process, without augmentation in worker processes). ``best.pt`` holds the weights and
the scores only.
"""

import random

import numpy as np
import torch
import torch.distributed as dist

from guided_diffusion import logger
from guided_diffusion.checkpoint import load_checkpoint, load_weights, save_checkpoint, unwrap_model
from guided_diffusion.errors import CheckpointError, ConfigError
from supervised.setup import TRAIN_STREAM, stream_seed

# Config keys a resumed run must share with its checkpoint (they shape the network).
_SAME_ON_RESUME = ("arch", "arch_kwargs", "base_channels", "depth", "in_channels", "num_classes")


def rng_state(generator):
    """This process's random number generators as tensors and plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_state[0],
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["generator"].cpu())
    np_state = state["numpy"]
    np.random.set_state((
        "MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
        np_state["has_gauss"], np_state["cached_gaussian"],
    ))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather_rng_states(generator, world_size):
    """Every rank's generator states, as a list indexed by rank (a collective under torchrun)."""
    own = rng_state(generator)
    if world_size == 1:
        return [own]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, own)
    return gathered


def save(run, path, *, training_state):
    """Write ``path`` on rank 0 (every rank must call it: the generators are gathered).

    :param training_state: also the optimizer, schedule, scaler and generators (what a resume
        needs); False for ``best.pt``.
    """
    state = run.state
    rng = gather_rng_states(run.generator, run.ctx.world_size) if training_state else None
    if not run.ctx.is_main:
        return
    extra = {
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "val_dice": state.val_dice,
        "best_val_dice": state.best_val_dice,
        "best_step": state.best_step,
        "validated_step": state.validated_step,
    }
    if state.val_dice_by_channel is not None:
        extra["val_dice_by_channel"] = dict(state.val_dice_by_channel)
    if training_state:
        extra.update(
            scheduler=run.scheduler.state_dict(),
            lr_schedule=run.options.lr_schedule,
            scaler=run.scaler.state_dict(),
            rng=rng,
            world_size=run.ctx.world_size,
        )
    save_checkpoint(
        path, kind=run.kind, model_state=unwrap_model(run.model).state_dict(), config=run.config,
        optimizer=run.optimizer.state_dict() if training_state else None, step=state.step,
        extra=extra,
    )


def _check_resume_config(path, saved, current):
    for key in _SAME_ON_RESUME:
        if key in saved and key in current and saved[key] != current[key]:
            flag = "--" + key if key not in ("in_channels", "num_classes") else key
            raise ConfigError(
                f"{flag} {current[key]!r} does not match the checkpoint {path} being resumed "
                f"(trained with {saved[key]!r})"
            )


def _restore_schedule(run, path, ckpt):
    extra, options = ckpt["extra"], run.options
    if extra.get("lr_schedule") == options.lr_schedule and "scheduler" in extra:
        run.scheduler.load_state_dict(extra["scheduler"])
        return
    # Switching schedules on resume: the new one starts from the step reached.
    if options.lr_schedule == "cosine":
        run.scheduler.last_epoch = ckpt["step"]
    logger.log(f"{path}: trained with --lr_schedule {extra.get('lr_schedule')}; "
               f"going on with {options.lr_schedule}")


def _restore_generators(run, path, rng):
    ctx = run.ctx
    if len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank], run.generator)
        return
    # Another number of processes than when saved: fresh, distinct streams per rank.
    run.generator.manual_seed(stream_seed(run.options.seed + run.state.step, TRAIN_STREAM, ctx.rank))
    logger.log(f"{path} was saved by {len(rng)} process(es), resumed by {ctx.world_size}: "
               "random streams re-seeded")


def restore(run, path):
    """Continue ``run`` from the training-state checkpoint ``path``."""
    ckpt = load_checkpoint(path, kind=run.kind, map_location="cpu")
    _check_resume_config(path, ckpt["config"], run.config)
    if ckpt["optimizer"] is None:
        raise CheckpointError(
            f"{path} holds no optimizer state (best.pt is weights only); resume from "
            f"{run.kind}_<step>.pt or final.pt"
        )
    load_weights(run.model, ckpt["model"], source=str(path))
    run.optimizer.load_state_dict(ckpt["optimizer"])
    _restore_schedule(run, path, ckpt)
    extra, state = ckpt["extra"], run.state
    if run.scaler.is_enabled() and extra.get("scaler"):
        run.scaler.load_state_dict(extra["scaler"])
    state.step = int(ckpt["step"])
    state.epoch = int(extra.get("epoch", 0))
    state.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
    state.val_dice = extra.get("val_dice")
    state.best_val_dice = extra.get("best_val_dice")
    state.best_step = extra.get("best_step")
    state.validated_step = extra.get("validated_step")
    state.val_dice_by_channel = extra.get("val_dice_by_channel")
    _restore_generators(run, path, extra.get("rng") or [])
    logger.log(f"resumed from {path} at step {state.step} (epoch {state.epoch})")
