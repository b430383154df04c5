"""The supervised training engine shared by the pre-segmentation and the denoising trainers.

One short explicit loop (in the spirit of nanoGPT's ``train.py``)::

    for each epoch (a seeded shuffle of the training items, sharded across ranks):
        for each batch:
            input, target = batch_to_input_target(batch, generator)   # the only difference
            loss = ce_weight * CE + dice_weight * (1 - soft Dice)      # logits vs target
            AdamW step (autocast + GradScaler, gradient clipping), lr schedule
            validation Dice every epoch (or every --val_interval steps) -> best.pt
            <kind>_<step:07d>.pt every --save_interval steps (the newest --keep_checkpoints kept)
    final.pt

``train_preseg_network.py`` maps a batch to ``(image, label)``; ``train_denoising_network.py``
to ``(noisy label at level T [+ image], label)``, drawing its noise from ``generator`` (the
engine's own, restored on resume). Validation calls the same function with a generator
re-seeded to the same value at every validation, so a noisy validation input is the same at
every epoch and the scores are comparable.

Validation Dice: hard Dice of the whole foreground (every non-background class) per image,
averaged over the validation items of all ranks (an empty prediction of an empty label
scores 1).

Resume (``--resume auto`` or ``--resume_checkpoint PATH``) restores the model, optimizer,
lr schedule, gradient scaler, step, epoch (and the position inside it), best score and every
random number generator, so that 2 + 2 steps give the same weights as 4 (bit for bit, in one
process, without augmentation in worker processes).
"""

import math
import os
import random
import re
import time
from dataclasses import dataclass

import blobfile as bf
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from data import GroupedSampler, collate
from data.datasets import DEFAULT_CACHE_VOLUMES
from guided_diffusion import logger, run_report
from guided_diffusion.atomic import check_writable_dir, remove_stale_temp_files
from guided_diffusion.checkpoint import (
    FINAL_NAME,
    final_is_current,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    unwrap_model,
)
from guided_diffusion.dist_util import autocast_context, make_grad_scaler, setup_dist, wrap_model
from guided_diffusion.errors import AddpmError, CheckpointError, ConfigError
from preseg.losses import SegmentationLoss, dice_per_image

# Streams of the engine's generators (mixed with the seed and the rank).
_TRAIN_STREAM = 1
_VALIDATION_STREAM = 2
_LOADER_STREAM = 3


@dataclass
class TrainResult:
    """What a finished run reports."""

    step: int
    epoch: int
    val_dice: float | None
    best_val_dice: float | None
    out_dir: str
    final_path: str
    best_path: str | None


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    val_dice: float | None = None
    best_val_dice: float | None = None
    best_step: int | None = None
    validated_step: int | None = None


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


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators (weights, dropout, augmentation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stream_seed(seed, stream, rank):
    # Mixes (seed, stream, rank) into independent 63-bit seeds; consecutive seeds alone give
    # correlated-looking but valid streams, a hash removes the doubt.
    state = np.random.SeedSequence([int(seed) % 2**32, stream, rank]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _make_generator(device, seed):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _to_device(batch, device):
    moved = dict(batch)
    non_blocking = device.type == "cuda"
    for key in ("image", "label"):
        if key in moved:
            moved[key] = moved[key].to(device, non_blocking=non_blocking)
    return moved


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

    The generator given to ``batch_to_input_target`` is seeded to the same value at every
    call, so a noisy input is identical from one validation to the next.

    :param model: network mapping ``input`` [B, Cin, H, W] to logits [B, K, H, W].
    :return: float, the mean per-image Dice over the whole dataset (all ranks).
    """
    device = torch.device(device)
    # Every item once: this rank's share in dataset order, without the padding of training.
    sampler = EpochBatchSampler(range(rank, len(dataset), world_size), batch_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(_stream_seed(seed, _LOADER_STREAM, rank)))
    generator = _make_generator(device, _stream_seed(seed, _VALIDATION_STREAM, rank))
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            batch = _to_device(batch, device)
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


def _total_steps(options, steps_per_epoch):
    bounds = []
    if options.max_steps > 0:
        bounds.append(options.max_steps)
    if options.max_epoch > 0:
        bounds.append(options.max_epoch * steps_per_epoch)
    return min(bounds)


def _make_scheduler(optimizer, options, total_steps):
    if options.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=options.plateau_factor, patience=options.plateau_patience
        )

    def cosine(step):
        # lr(step) = lr * (1 + cos(pi * step / total)) / 2: from --lr at step 0 towards 0.
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def _rng_state(generator):
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


def _set_rng_state(state, generator):
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


def _gather_rng_states(generator, world_size):
    """Every rank's generator states, as a list indexed by rank (a collective under torchrun)."""
    own = _rng_state(generator)
    if world_size == 1:
        return [own]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, own)
    return gathered


_NUMBERED = re.compile(r"^(?P<kind>[a-z]+)_(?P<step>\d{7,})\.pt$")


def _numbered_checkpoints(out_dir, kind):
    """``(step, path)`` of the ``<kind>_<step:07d>.pt`` files in ``out_dir``, by step."""
    if not bf.isdir(out_dir):
        return []
    found = []
    for name in bf.listdir(out_dir):
        match = _NUMBERED.match(name)
        if match and match["kind"] == kind:
            found.append((int(match["step"]), bf.join(out_dir, name)))
    return sorted(found)


def _resume_path(options, kind, out_dir):
    """The checkpoint to resume from, or None to start fresh."""
    explicit = options.resume_checkpoint
    if explicit and explicit != "auto":
        return explicit
    if options.resume != "auto" and explicit != "auto":
        return None
    # best.pt holds no optimizer state; every other checkpoint of ours can be resumed.
    candidates = [
        (step, path) for step, path in list_checkpoints(out_dir, kind=kind)
        if bf.basename(path) != "best.pt"
    ]
    if not candidates:
        return None
    top = max(step for step, _ in candidates)
    newest = [path for step, path in candidates if step == top]
    # At equal steps, final.pt (written last) wins over a numbered file of the same step.
    newest.sort(key=lambda path: bf.basename(path) != FINAL_NAME)
    return newest[0]


def _check_resume_config(path, saved, current):
    for key in ("arch", "arch_kwargs", "base_channels", "depth", "in_channels", "num_classes"):
        if key in saved and key in current and saved[key] != current[key]:
            flag = "--" + key if key not in ("in_channels", "num_classes") else key
            raise ConfigError(
                f"{flag} {current[key]!r} does not match the checkpoint {path} being resumed "
                f"(trained with {saved[key]!r})"
            )


def resolve_out_dir(options, kind):
    """``--out_dir``, else ``$OPENAI_LOGDIR/<kind>``, else ``runs/<kind>``.

    A fixed default (not date-stamped) is where sample.py looks for runs/<kind>/best.pt; under
    OPENAI_LOGDIR each kind gets its own folder, so the two supervised trainers never share one.
    """
    log_root = os.environ.get("OPENAI_LOGDIR")
    return options.out_dir or (os.path.join(log_root, kind) if log_root else os.path.join("runs", kind))


def check_out_dir(options, kind):
    """The run's output folder, refused (one line) before any work when it cannot be written
    or holds the checkpoints of another run that this one does not resume. Writes nothing."""
    out_dir = resolve_out_dir(options, kind)
    check_writable_dir(out_dir, "--out_dir")
    if not (options.resume == "auto" or options.resume_checkpoint):
        _check_fresh_out_dir(out_dir, kind)
    return out_dir


def _check_fresh_out_dir(out_dir, kind):
    """Refuse to start a fresh run over the checkpoints of an earlier one."""
    numbered = _numbered_checkpoints(out_dir, kind)
    found = numbered[-1][1] if numbered else None
    if found is None and bf.exists(bf.join(out_dir, FINAL_NAME)):
        found = bf.join(out_dir, FINAL_NAME)
    if found is not None:
        raise ConfigError(
            f"--out_dir {out_dir} already holds {found}: pass --resume auto to continue, or "
            "another --out_dir"
        )


def train(*, kind, model, config, train_set, val_set, batch_to_input_target, options, ctx=None):
    """Train ``model`` on ``train_set``, validating on ``val_set``; the shared loop.

    :param kind: checkpoint kind, "preseg" or "denoiser" (also the prefix of numbered files).
    :param model: the network (already seeded and built on the CPU), ``forward(input [B,Cin,H,W])
        -> logits [B,K,H,W]``.
    :param config: the checkpoint config (plain types) that rebuilds ``model`` and its
        preprocessing; stored in every checkpoint.
    :param train_set, val_set: datasets of items ``{"image", "label", "case_id", "meta"}``;
        ``val_set`` may be None or empty (no validation, no best.pt).
    :param batch_to_input_target: ``f(batch, generator) -> (input [B,Cin,H,W] float, target
        [B,H,W] int64)``, batch already on the device; random draws only from ``generator``.
    :param options: ``TrainOptions``.
    :param ctx: ``DistContext`` from ``dist_util.setup_dist``; None = set up from
        ``options.device`` here.
    :return: ``TrainResult``.
    """
    options.check()
    if ctx is None:
        ctx = setup_dist(options.device)
    device = ctx.device
    autocast_context(device, options.precision)  # fp16 off CUDA fails here, before any work
    if len(train_set) == 0:
        raise ConfigError("the training set is empty: nothing to train on (check --data_dir and --val_fraction)")
    # Nothing is written before a resumed checkpoint is checked: log lines are held until the
    # logger is configured below.
    out_dir = check_out_dir(options, kind)
    has_val = val_set is not None and len(val_set) > 0

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
        generator=torch.Generator().manual_seed(_stream_seed(options.seed, _LOADER_STREAM, ctx.rank)),
    )
    total_steps = _total_steps(options, steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = _make_scheduler(optimizer, options, total_steps)
    scaler = make_grad_scaler(device, options.precision)
    loss_fn = SegmentationLoss(ce_weight=options.ce_weight, dice_weight=options.dice_weight)
    generator = _make_generator(device, _stream_seed(options.seed, _TRAIN_STREAM, ctx.rank))
    state = _State()

    resume_path = _resume_path(options, kind, out_dir)
    if resume_path is not None:
        _restore(resume_path, kind, model, config, optimizer, scheduler, scaler, generator, state,
                 options, ctx)
    elif options.resume == "auto" or options.resume_checkpoint == "auto":
        logger.log(f"no checkpoint to resume in {out_dir}; starting fresh")
    start_step = state.step
    if ctx.is_main:
        remove_stale_temp_files(out_dir, depth=0)
    logger.configure(dir=out_dir, rank=ctx.rank)

    net = wrap_model(model, ctx)
    net.train()
    logger.log(_run_header(kind, model, config, train_set, val_set if has_val else None, options, ctx,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps, start_step=start_step,
                           out_dir=out_dir))
    started = time.perf_counter()

    def save(path, *, training_state):
        rng = _gather_rng_states(generator, ctx.world_size) if training_state else None
        if not ctx.is_main:
            return
        extra = {
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "val_dice": state.val_dice,
            "best_val_dice": state.best_val_dice,
            "best_step": state.best_step,
            "validated_step": state.validated_step,
        }
        if training_state:
            extra.update(
                scheduler=scheduler.state_dict(),
                lr_schedule=options.lr_schedule,
                scaler=scaler.state_dict(),
                rng=rng,
                world_size=ctx.world_size,
            )
        save_checkpoint(
            path, kind=kind, model_state=unwrap_model(model).state_dict(), config=config,
            optimizer=optimizer.state_dict() if training_state else None, step=state.step,
            extra=extra,
        )

    def validate():
        score = evaluate_dice(
            model, val_set, batch_to_input_target, batch_size=options.batch_size, device=device,
            precision=options.precision, seed=options.seed, num_workers=options.num_workers,
            rank=ctx.rank, world_size=ctx.world_size,
        )
        state.val_dice = score
        state.validated_step = state.step
        improved = state.best_val_dice is None or score > state.best_val_dice
        if improved:
            state.best_val_dice, state.best_step = score, state.step
            save(bf.join(out_dir, "best.pt"), training_state=False)
        if options.lr_schedule == "plateau":
            scheduler.step(score)
        logger.logkv("val_dice", score)
        logger.log(
            f"step {state.step} (epoch {state.epoch}): validation Dice {score:.4f}"
            f"{' (best)' if improved else f' (best {state.best_val_dice:.4f} at step {state.best_step})'}"
        )

    def done():
        return (options.max_steps > 0 and state.step >= options.max_steps) or (
            options.max_epoch > 0 and state.epoch >= options.max_epoch
        )

    progress = tqdm(total=total_steps, initial=min(state.step, total_steps), desc=f"train {kind}",
                    disable=not ctx.is_main, dynamic_ncols=True)
    interval_start, interval_samples = time.perf_counter(), 0
    while not done():
        sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in loader:
            batch = _to_device(batch, device)
            inputs, target = batch_to_input_target(batch, generator)
            with autocast_context(device, options.precision):
                logits = net(inputs)
            terms = loss_fn.components(logits, target)
            loss = options.ce_weight * terms["ce"] + options.dice_weight * terms["dice_loss"]
            if not torch.isfinite(loss):
                raise AddpmError(
                    f"training diverged: the loss is {loss.item()} at step {state.step}; lower --lr "
                    "or use --precision fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if options.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            if options.lr_schedule == "cosine":
                scheduler.step()

            state.step += 1
            state.batch_in_epoch += 1
            epoch_ended = state.batch_in_epoch >= steps_per_epoch
            if epoch_ended:
                state.epoch += 1
                state.batch_in_epoch = 0
            interval_samples += inputs.shape[0] * ctx.world_size
            logger.logkv_mean("loss", loss.item())
            logger.logkv_mean("ce", terms["ce"].item())
            logger.logkv_mean("dice_loss", terms["dice_loss"].item())
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

            # The last step is always validated, so that a run bounded inside an epoch still
            # ends with the score of its final weights (and a best.pt).
            if has_val and (
                (options.val_interval > 0 and state.step % options.val_interval == 0)
                or (options.val_interval == 0 and epoch_ended)
                or done()
            ):
                validate()
            if state.step % options.log_interval == 0 or done():
                elapsed = time.perf_counter() - interval_start
                logger.logkv("step", state.step)
                logger.logkv("epoch", state.epoch)
                logger.logkv("samples", state.step * options.batch_size * ctx.world_size)
                logger.logkv("lr", lr)
                logger.logkv("samples_per_sec", interval_samples / max(elapsed, 1e-9))
                logger.dumpkvs()
                interval_start, interval_samples = time.perf_counter(), 0
            if options.save_interval > 0 and state.step % options.save_interval == 0:
                save(bf.join(out_dir, f"{kind}_{state.step:07d}.pt"), training_state=True)
                if ctx.is_main:
                    _prune(out_dir, kind, options.keep_checkpoints)
            if done():
                break
    progress.close()

    # A resumed run that had already reached its bound still reports its final score.
    validated_now = has_val and state.validated_step != state.step
    if validated_now:
        validate()
        logger.dumpkvs()
    logger.draw_curves()
    final_path = bf.join(out_dir, FINAL_NAME)
    # Written unless it already holds this end state (a run resumed at its bound); a missing
    # one (a kill during its write) is written again.
    if state.step != start_step or validated_now or not final_is_current(out_dir, state.step, kind):
        save(final_path, training_state=True)
        logger.log(f"saved {final_path} at step {state.step}")
    result = TrainResult(
        step=state.step, epoch=state.epoch, val_dice=state.val_dice,
        best_val_dice=state.best_val_dice, out_dir=out_dir, final_path=final_path,
        best_path=bf.join(out_dir, "best.pt") if state.best_step is not None else None,
    )
    logger.log(run_report.training_closing(
        f"{kind} training", seconds=time.perf_counter() - started, step=state.step, out_dir=out_dir,
        final_path=final_path, val_score=state.val_dice, best_score=state.best_val_dice,
        best_step=state.best_step, best_path=result.best_path))
    return result


def _run_header(kind, model, config, train_set, val_set, options, ctx, *, steps_per_epoch, total_steps,
                start_step, out_dir) -> str:
    """The block a trainer prints before its first step (``guided_diffusion.run_report``)."""
    n_params = sum(p.numel() for p in model.parameters())
    steps = (f"{total_steps} ({steps_per_epoch} per epoch), batch {options.batch_size} x "
             f"{run_report.processes(ctx.world_size)}")
    if start_step:
        steps += f", resumed at step {start_step}"
    if val_set is None:
        validation = "none: no validation Dice, no best.pt"
    else:
        every = f"every {options.val_interval} steps" if options.val_interval else "every epoch"
        validation = f"{len(val_set)} items, Dice {every}"
    every = f"{kind}_<step>.pt every {options.save_interval} steps, " if options.save_interval > 0 else ""
    return run_report.header(f"{kind} training", [
        ("network", f"{config.get('arch')}, {n_params:,} parameters"),
        ("device", f"{ctx.device}, {options.precision}, {run_report.processes(ctx.world_size)}"),
        ("data", _data_text(train_set)),
        ("validation", validation),
        ("steps", steps),
        ("out_dir", f"{out_dir}: {every}{'best.pt, ' if val_set is not None else ''}final.pt, "
                    "progress.csv, curves.png, log.txt"),
    ])


def _data_text(dataset) -> str:
    """``DIR: 200 training items (brats2d)``; a Subset names its dataset's folder."""
    source = getattr(dataset, "dataset", dataset)
    root, layout = getattr(source, "root", None), getattr(source, "layout", None)
    return f"{f'{root}: ' if root else ''}{len(dataset)} training items{f' ({layout})' if layout else ''}"


def _prune(out_dir, kind, keep):
    if keep <= 0:
        return
    for _, path in _numbered_checkpoints(out_dir, kind)[:-keep]:
        bf.remove(path)


def _restore(path, kind, model, config, optimizer, scheduler, scaler, generator, state, options, ctx):
    ckpt = load_checkpoint(path, kind=kind, map_location="cpu")
    _check_resume_config(path, ckpt["config"], config)
    if ckpt["optimizer"] is None:
        raise CheckpointError(
            f"{path} holds no optimizer state (best.pt is weights only); resume from "
            f"{kind}_<step>.pt or final.pt"
        )
    load_weights(model, ckpt["model"], source=str(path))
    optimizer.load_state_dict(ckpt["optimizer"])
    extra = ckpt["extra"]
    if extra.get("lr_schedule") == options.lr_schedule and "scheduler" in extra:
        scheduler.load_state_dict(extra["scheduler"])
    else:
        # Switching schedules on resume: the new one starts from the step reached.
        if options.lr_schedule == "cosine":
            scheduler.last_epoch = ckpt["step"]
        logger.log(f"{path}: trained with --lr_schedule {extra.get('lr_schedule')}; "
                   f"going on with {options.lr_schedule}")
    if scaler.is_enabled() and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    state.step = int(ckpt["step"])
    state.epoch = int(extra.get("epoch", 0))
    state.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
    state.val_dice = extra.get("val_dice")
    state.best_val_dice = extra.get("best_val_dice")
    state.best_step = extra.get("best_step")
    state.validated_step = extra.get("validated_step")
    rng = extra.get("rng") or []
    if len(rng) == ctx.world_size:
        _set_rng_state(rng[ctx.rank], generator)
    else:
        # Another number of processes than when saved: fresh, distinct streams per rank.
        generator.manual_seed(_stream_seed(options.seed + state.step, _TRAIN_STREAM, ctx.rank))
        logger.log(f"{path} was saved by {len(rng)} process(es), resumed by {ctx.world_size}: "
                   "random streams re-seeded")
    logger.log(f"resumed from {path} at step {state.step} (epoch {state.epoch})")
