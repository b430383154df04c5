"""The supervised training loop shared by the pre-segmentation and the denoising trainers.

One short explicit loop (in the spirit of nanoGPT's ``train.py``)::

    for each epoch (a seeded shuffle of the training items, sharded across ranks):
        for each batch:
            input, target = batch_to_input_target(batch, generator)   # the only difference
            loss = ce_weight * CE + dice_weight * (1 - soft Dice)      # BCE for regions
            AdamW step (autocast + GradScaler, gradient clipping), lr schedule
            validation Dice every epoch (or every --val_interval steps) -> best.pt
            <kind>_<step:07d>.pt every --save_interval steps (the newest --keep_checkpoints kept)
    final.pt

``train_preseg_network.py`` maps a batch to ``(image, label)``; ``train_denoising_network.py``
to ``(noisy label at level T [+ image], label)``, drawing its noise from ``generator`` (the
engine's own, restored on resume). Validation: ``supervised.validation``; checkpoints and
resume (``--resume auto`` or ``--resume_checkpoint PATH``, the policy of
``guided_diffusion.run_dir``): ``supervised.checkpointer``.
"""

import time
from dataclasses import dataclass

import blobfile as bf
from tqdm import tqdm

from guided_diffusion import logger, run_dir, run_report
from guided_diffusion.checkpoint import FINAL_NAME
from guided_diffusion.dist_util import autocast_context, setup_dist, wrap_model
from guided_diffusion.errors import ConfigError
from guided_diffusion.run_dir import BEST_NAME
from supervised.checkpointer import restore, save
from supervised.setup import build_run, check_out_dir
from supervised.step import dump_interval, log_step, train_step
from supervised.validation import validate


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


def train(*, kind, model, config, train_set, val_set, batch_to_input_target, options, ctx=None):
    """Train ``model`` on ``train_set``, validating on ``val_set``; the shared loop.

    :param kind: checkpoint kind, "preseg" or "denoiser" (also the prefix of numbered files).
    :param model: the network (already seeded and built on the CPU), ``forward(input [B,Cin,H,W])
        -> logits [B,K,H,W]``.
    :param config: the checkpoint config (plain types) that rebuilds ``model`` and its
        preprocessing; stored in every checkpoint.
    :param train_set, val_set: datasets of items ``{"image", "label", "case_id", "meta"}``;
        ``val_set`` may be None or empty (no validation, no best.pt).
    :param batch_to_input_target: ``f(batch, generator) -> (input [B,Cin,H,W] float, target)``,
        the target being the batch's label ([B,H,W] int64, or [B,K,H,W] {0,1} with several
        classes or regions), batch already on the device; random draws only from ``generator``.
    :param options: ``TrainOptions``.
    :param ctx: ``DistContext`` from ``dist_util.setup_dist``; None = set up from
        ``options.device`` here.
    :return: ``TrainResult``.
    """
    options.check()
    if ctx is None:
        ctx = setup_dist(options.device)
    autocast_context(ctx.device, options.precision)  # fp16 off CUDA fails here, before any work
    if len(train_set) == 0:
        raise ConfigError("the training set is empty: nothing to train on (check --data_dir and --val_fraction)")
    # Nothing is written before a resumed checkpoint is checked: log lines are held until the
    # run folder is opened below.
    out_dir = check_out_dir(options, kind)
    run = build_run(kind=kind, model=model, config=config, train_set=train_set, val_set=val_set,
                    batch_to_input_target=batch_to_input_target, options=options, ctx=ctx, out_dir=out_dir)
    resume_path = run_dir.resume_path(out_dir, kind, resume=options.resume,
                                      resume_checkpoint=options.resume_checkpoint, exclude=(BEST_NAME,))
    if resume_path is not None:
        restore(run, resume_path)
    start_step = run.state.step
    run_dir.open_run_dir(out_dir, ctx)
    run.net = wrap_model(model, ctx)
    run.net.train()
    _log_start(run, start_step)
    started = time.perf_counter()
    _train_until_done(run)
    return _finish(run, start_step, time.perf_counter() - started)


def _log_start(run, start_step):
    """The block a trainer prints before its first step (``guided_diffusion.run_report``)."""
    options = run.options
    n_params = sum(p.numel() for p in run.model.parameters())
    processes = run_report.processes(run.ctx.world_size)
    steps = f"{run.total_steps} ({run.steps_per_epoch} per epoch), batch {options.batch_size} x {processes}"
    if start_step:
        steps += f", resumed at step {start_step}"
    if not run.has_val:
        validation = "none: no validation Dice, no best.pt"
    else:
        every = f"every {options.val_interval} steps" if options.val_interval else "every epoch"
        validation = f"{len(run.val_set)} items, Dice {every}"
    every = f"{run.kind}_<step>.pt every {options.save_interval} steps, " if options.save_interval > 0 else ""
    best = "best.pt, " if run.has_val else ""
    logger.log(run_report.header(f"{run.kind} training", [
        ("network", f"{run.config.get('arch')}, {n_params:,} parameters"),
        ("device", f"{run.device}, {options.precision}, {processes}"),
        ("data", _data_text(run.train_set)),
        ("validation", validation),
        ("steps", steps),
        ("out_dir", f"{run.out_dir}: {every}{best}final.pt, progress.csv, curves.png, log.txt"),
    ]))


def _data_text(dataset) -> str:
    """``DIR: 200 training items (brats2d)``; a Subset names its dataset's folder."""
    source = getattr(dataset, "dataset", dataset)
    root, layout = getattr(source, "root", None), getattr(source, "layout", None)
    return f"{f'{root}: ' if root else ''}{len(dataset)} training items{f' ({layout})' if layout else ''}"


def _train_until_done(run):
    options, state = run.options, run.state
    progress = tqdm(total=run.total_steps, initial=min(state.step, run.total_steps), desc=f"train {run.kind}",
                    disable=not run.ctx.is_main, dynamic_ncols=True)
    interval_start, interval_samples = time.perf_counter(), 0
    while not run.done():
        run.sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in run.loader:
            stats = train_step(run, batch)
            epoch_ended = state.advance(run.steps_per_epoch)
            interval_samples += stats["samples"] * run.ctx.world_size
            log_step(stats)
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
            # The last step is always validated, so that a run bounded inside an epoch still
            # ends with the score of its final weights (and a best.pt).
            if run.has_val and (
                (options.val_interval > 0 and state.step % options.val_interval == 0)
                or (options.val_interval == 0 and epoch_ended)
                or run.done()
            ):
                validate(run)
            if state.step % options.log_interval == 0 or run.done():
                dump_interval(run, stats["lr"], interval_samples, time.perf_counter() - interval_start)
                interval_start, interval_samples = time.perf_counter(), 0
            if options.save_interval > 0 and state.step % options.save_interval == 0:
                save(run, run_dir.checkpoint_path(run.out_dir, run.kind, state.step), training_state=True)
                if run.ctx.is_main:
                    run_dir.prune_checkpoints(run.out_dir, run.kind, options.keep_checkpoints)
            if run.done():
                break
    progress.close()


def _finish(run, start_step, seconds):
    """Validate the end state if that has not happened yet, write final.pt, report."""
    state, out_dir = run.state, run.out_dir
    # A resumed run that had already reached its bound still reports its final score.
    validated_now = run.has_val and state.validated_step != state.step
    if validated_now:
        validate(run)
        logger.dumpkvs()
    logger.draw_curves()
    final_path = bf.join(out_dir, FINAL_NAME)
    # Written unless it already holds this end state (a run resumed at its bound); a missing
    # one (a kill during its write) is written again.
    if state.step != start_step or validated_now or not run_dir.final_is_current(out_dir, state.step, run.kind):
        save(run, final_path, training_state=True)
        logger.log(f"saved {final_path} at step {state.step}")
    result = TrainResult(
        step=state.step, epoch=state.epoch, val_dice=state.val_dice,
        best_val_dice=state.best_val_dice, out_dir=out_dir, final_path=final_path,
        best_path=bf.join(out_dir, BEST_NAME) if state.best_step is not None else None,
    )
    logger.log(run_report.training_closing(
        f"{run.kind} training", seconds=seconds, step=state.step, out_dir=out_dir,
        final_path=final_path, val_score=state.val_dice, best_score=state.best_val_dice,
        best_step=state.best_step, best_path=result.best_path))
    return result
