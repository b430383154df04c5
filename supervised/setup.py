"""What a supervised run is built from: its folder, batches, optimizer, schedule and generators.

``build_run`` gathers them in one ``Run``; the step, the validation and the checkpointer read
and update it, and ``engine.train`` drives them.
"""

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from data import GroupedSampler, Preprocess, collate
from data.datasets import DEFAULT_CACHE_VOLUMES
from guided_diffusion import run_dir
from guided_diffusion.dist_util import make_grad_scaler
from guided_diffusion.run_dir import mix_seed
from preseg.losses import make_loss

# Streams of the engine's generators (mixed with the seed and the rank).
TRAIN_STREAM = 1
VALIDATION_STREAM = 2
LOADER_STREAM = 3


def stream_seed(seed, stream, rank):
    """The seed of one of the engine's generators: independent per (seed, stream, rank)."""
    return mix_seed(seed, stream, rank, scheme="stream")


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators (weights, dropout, augmentation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(device, seed):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def to_device(batch, device):
    moved = dict(batch)
    non_blocking = device.type == "cuda"
    for key in ("image", "label"):
        if key in moved:
            moved[key] = moved[key].to(device, non_blocking=non_blocking)
    return moved


class EpochBatchSampler(Sampler):
    """Batches of item indices over an epoch order; an epoch can start at any batch.

    The order comes from ``order`` (an iterable of indices with ``set_epoch``, e.g.
    ``data.GroupedSampler``: a seeded shuffle per epoch that keeps the slices of a few volumes
    together, sharded across ranks as DistributedSampler). ``set_epoch(e, start_batch=b)``
    skips the first ``b`` batches, so that a resumed run goes on exactly where the interrupted
    one stopped, loading nothing it skips. ``drop_last`` drops a trailing partial batch when
    there is at least one full batch.
    """

    def __init__(self, order, batch_size, *, drop_last=False):
        self.order = order
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)
        self.start_batch = start_batch

    def batches(self):
        """All batches of the current epoch (lists of indices)."""
        indices = list(self.order)
        size = self.batch_size
        batches = [indices[i:i + size] for i in range(0, len(indices), size)]
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < size:
            batches.pop()
        return batches

    def __iter__(self):
        yield from self.batches()[self.start_batch:]

    def __len__(self):
        return max(len(self.batches()) - self.start_batch, 0)


def out_dir_of(options, kind):
    """``--out_dir``, else ``$OPENAI_LOGDIR/<kind>``, else ``runs/<kind>``.

    A fixed default (not date-stamped) is where sample.py looks for runs/<kind>/best.pt; under
    OPENAI_LOGDIR each kind gets its own folder, so the two supervised trainers never share one.
    """
    return run_dir.resolve_out_dir(options.out_dir, os.path.join("runs", kind), logdir_subfolder=kind)


def check_out_dir(options, kind):
    """The run's output folder, refused (one line) before any work when it cannot be written
    or holds the checkpoints of another run that this one does not resume. Writes nothing."""
    out_dir = out_dir_of(options, kind)
    run_dir.check_out_dir(out_dir, kind, resume=options.resume, resume_checkpoint=options.resume_checkpoint)
    return out_dir


@dataclass
class RunState:
    """Where a run is; saved in every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    val_dice: float | None = None
    best_val_dice: float | None = None
    best_step: int | None = None
    validated_step: int | None = None
    # {class or region name: Dice} of the last validation, for K > 1 mask channels (else None).
    val_dice_by_channel: dict | None = None

    def advance(self, steps_per_epoch):
        """Count one step; True when it ended an epoch."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch < steps_per_epoch:
            return False
        self.epoch += 1
        self.batch_in_epoch = 0
        return True


@dataclass
class Run:
    """Everything one supervised run works with (see ``build_run``)."""

    kind: str
    model: torch.nn.Module
    config: dict
    options: Any
    ctx: Any
    out_dir: str
    train_set: Any
    val_set: Any
    batch_to_input_target: Callable
    sampler: EpochBatchSampler
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loss_fn: torch.nn.Module
    generator: torch.Generator
    preprocess: Preprocess = field(default_factory=Preprocess)
    state: RunState = field(default_factory=RunState)
    net: torch.nn.Module | None = None  # the model as trained (DDP-wrapped under torchrun)

    @property
    def device(self):
        return self.ctx.device

    @property
    def has_val(self):
        return self.val_set is not None and len(self.val_set) > 0

    def done(self):
        options, state = self.options, self.state
        return (options.max_steps > 0 and state.step >= options.max_steps) or (
            options.max_epoch > 0 and state.epoch >= options.max_epoch
        )


def total_steps_of(options, steps_per_epoch):
    bounds = []
    if options.max_steps > 0:
        bounds.append(options.max_steps)
    if options.max_epoch > 0:
        bounds.append(options.max_epoch * steps_per_epoch)
    return min(bounds)


def make_scheduler(optimizer, options, total_steps):
    if options.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=options.plateau_factor, patience=options.plateau_patience
        )

    def cosine(step):
        # lr(step) = lr * (1 + cos(pi * step / total)) / 2: from --lr at step 0 towards 0.
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def run_preprocess(config):
    """The run's ``Preprocess`` (label mode, class names) from its checkpoint config; a config
    without one (a network built by hand) is binary."""
    record = config.get("preprocess")
    return Preprocess.from_dict(record) if record else Preprocess()


def build_run(*, kind, model, config, train_set, val_set, batch_to_input_target, options, ctx, out_dir):
    """Move ``model`` to the device and build the batches, optimizer, schedule, scaler, loss and
    the training generator of a fresh run (``checkpointer.restore`` turns it into a resumed one)."""
    device = ctx.device
    model.to(device)
    order = GroupedSampler(train_set, shuffle=True, seed=options.seed, rank=ctx.rank,
                           world_size=ctx.world_size,
                           window=getattr(train_set, "cache_volumes", DEFAULT_CACHE_VOLUMES))
    sampler = EpochBatchSampler(order, options.batch_size, drop_last=len(order) >= options.batch_size)
    steps_per_epoch = len(sampler.batches())
    # One loader for the whole run: persistent workers keep their caches of decoded volumes.
    loader = DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate, num_workers=options.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=options.num_workers > 0,
        generator=torch.Generator().manual_seed(stream_seed(options.seed, LOADER_STREAM, ctx.rank)),
    )
    total_steps = total_steps_of(options, steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    preprocess = run_preprocess(config)
    return Run(
        kind=kind, model=model, config=config, options=options, ctx=ctx, out_dir=out_dir,
        train_set=train_set, val_set=val_set, batch_to_input_target=batch_to_input_target,
        sampler=sampler, loader=loader, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        optimizer=optimizer, scheduler=make_scheduler(optimizer, options, total_steps),
        scaler=make_grad_scaler(device, options.precision),
        loss_fn=make_loss(preprocess, ce_weight=options.ce_weight, dice_weight=options.dice_weight),
        generator=make_generator(device, stream_seed(options.seed, TRAIN_STREAM, ctx.rank)),
        preprocess=preprocess,
    )
