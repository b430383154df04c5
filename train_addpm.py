"""Train ADDPM's conditional diffusion UNet: (image, noisy mask x_t, t) -> the noise in x_t.

The original ADDPM README's command runs as it is (with ``--data_dir``)::

    MODEL_FLAGS="--image_size 256 --num_channels 128 --class_cond False --num_res_blocks 2 --num_heads 1 --learn_sigma False --use_scale_shift_norm False --attention_resolutions 16"
    DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 4"
    python train_addpm.py --data_dir DIR $TRAIN_FLAGS $MODEL_FLAGS $DIFFUSION_FLAGS

It trains on the train side of the patient split that every trainer shares (``--val_fraction``
of the patients, default 0.1, is held out; ``--val_fraction 0`` trains on every case); channel
counts come from the data. Checkpoints (``diffusion_<step>.pt`` every ``--save_interval`` steps,
the newest ``--keep_checkpoints`` kept, and ``final.pt``) and logs (progress.csv, progress.jsonl,
log.txt) go to ``--out_dir`` (default: ``$OPENAI_LOGDIR``, else ./runs/addpm-<date-time>); a
folder that already holds checkpoints is refused unless the run resumes. The run ends at
``--max_steps`` or ``--lr_anneal_steps`` (both 0: when stopped). ``--resume auto`` continues from
the newest checkpoint in ``--out_dir`` (``--resume_checkpoint PATH``: from that file) with its
weights, EMA, optimizer state, step and data position; the step counter continues, so
``--max_steps`` is the total; a resumed run that is already at its end step writes a missing
``final.pt``. A non-finite loss stops the run with one line naming the last good checkpoint.
Nothing is written before the flags, the data and a resumed checkpoint are checked; temporary
files that a killed run left in ``--out_dir`` are removed.

Beyond the paper (each off by default; see README "Training where ADDPM samples"):

- ``--t_range 250,300`` trains on the levels the truncated sampler walks, ``--t_range_mix F``
  keeps a share F of every batch on the whole chain (so ddpm / ddim stay possible);
- ``--train_start preseg --preseg_path P --preseg_fraction F`` noises a share F of every batch
  from the frozen pre-segmentation of the training image instead of the label (the target stays
  the label), so the UNet learns to correct the pre-segmentation's own errors; best with
  ``--predict_xstart True``;
- ``--preseg_path P [--denoiser_path D] --val_interval N`` segments the held-out validation
  patients with the truncated sampler every N steps, logs val Dice of addpm next to the
  pre-segmentation alone, and keeps ``best.pt`` by the addpm Dice.

With ``--classes 1,2,4`` or ``--regions "WT:1,2,4;TC:1,4;ET:4"`` the mask has one channel per
class or region (``mask_channels`` in the checkpoint; the UNet's input and output follow it) and
the validation logs ``val_addpm_dice_<name>`` / ``val_preseg_dice_<name>`` per class or region,
with their means as ``val_addpm_dice`` / ``val_preseg_dice`` (best.pt by the addpm mean). The
pre-segmentation and denoising nets must have been trained in the same label mode.

Several GPUs (or CPU processes, with gloo)::

    torchrun --standalone --nproc_per_node 4 train_addpm.py --data_dir DIR ...

Each process takes its own ``--batch_size`` examples per step, so the global batch is
``batch_size * nproc`` (``--batch_size 1`` on 4 GPUs matches the original batch of 4); rank 0
writes. A resume with the same number of processes is bit-identical to an uninterrupted run;
with another number it continues at the same sample of the same data order, with other noise.
"""

import argparse
import time

import blobfile as bf
import torch

from data import DATA_HELP, collate, data_defaults, dataset_from_args
from denoiser import load_final_step
from evaluation.validation import AddpmValidator
from guided_diffusion import dist_util, logger, run_report
from guided_diffusion.checkpoint import FINAL_NAME
from guided_diffusion.errors import ConfigError
from guided_diffusion.run_dir import BEST_NAME, dated_default, open_run_dir, resolve_out_dir, resume_path
from guided_diffusion.script_util import (
    HELP,
    add_dict_to_argparser,
    args_to_dict,
    create_gaussian_diffusion,
    create_model,
    diffusion_checkpoint_config,
    diffusion_defaults,
    run_cli,
    training_defaults,
    unet_defaults,
)
from guided_diffusion.resample import parse_t_range
from guided_diffusion.seg_sampling import DEFAULT_T, plan_sampler
from guided_diffusion.train_util import CHECKPOINT_KIND, TrainLoop, parse_ema_rates
from preseg import PresegSource

TRAIN_STARTS = ("label", "preseg")
# Flags that TrainLoop takes as they are, under the same names.
LOOP_FLAGS = ("batch_size", "microbatch", "lr", "weight_decay", "ema_rate", "lr_anneal_steps", "max_steps",
              "grad_clip", "schedule_sampler", "t_range_mix", "preseg_fraction", "val_interval", "log_interval",
              "save_interval", "keep_checkpoints", "mask_space", "seed", "num_workers", "progress")
SCRIPT_DEFAULTS = dict(
    out_dir="", resume="", keep_checkpoints=3, progress=True,
    t_range="", t_range_mix=0.0, train_start="label", preseg_fraction=0.5,
    preseg_path="", preseg_dir="", denoiser_path="",
    val_interval=0, val_sampling_steps=10, val_max_cases=64, val_batch_size=8, val_final_step="auto",
    pre_t=300, T=-1,
)
SCRIPT_HELP = {
    "out_dir": "folder for checkpoints and logs; empty = $OPENAI_LOGDIR, else ./runs/addpm-<date-time>",
    "resume": "auto = continue from the newest checkpoint in --out_dir (start fresh if there is none); empty = no",
    "keep_checkpoints": "how many diffusion_<step>.pt files to keep (final.pt is kept besides)",
    "progress": "show a progress bar",
    "t_range": "LO,HI: train only on the levels LO..HI, where the truncated sampler walks (e.g. 250,300); "
               "empty = the whole chain, as the original",
    "t_range_mix": "with --t_range, the fraction of every batch that is drawn from the whole chain instead",
    "train_start": "label: x_t is noised from the label (the original); preseg: a --preseg_fraction share of "
                   "every batch is noised from the pre-segmentation of its image, the label staying the target",
    "preseg_fraction": "with --train_start preseg, the share of every batch noised from the pre-segmentation",
    "preseg_path": "pre-segmentation checkpoint (train_preseg_network.py) for --train_start preseg and validation",
    "preseg_dir": "folder of precomputed pre-segmentations (as sample.py's --preseg_dir), instead of --preseg_path",
    "denoiser_path": "denoising checkpoint for the validation's final step (empty: the UNet's own x0)",
    "val_interval": "validate every this many steps (and at the end) on the held-out validation patients "
                    "with the truncated sampler, keeping best.pt by addpm Dice; 0 = never (needs --preseg_path)",
    "val_sampling_steps": "UNet evaluations per validation case inside [pre_t, T]; 0 = every step",
    "val_max_cases": "at most this many validation slices, spread over the validation patients; 0 = all",
    "val_batch_size": "validation images per sampling batch",
    "val_final_step": "denoiser or x0: the validation's final step; auto = denoiser when --denoiser_path is given",
    "pre_t": "validation: level where the noised pre-segmentation enters",
    "T": "validation: level where the truncated process ends; -1 = the denoiser's T (250 without one)",
}


def create_argparser() -> argparse.ArgumentParser:
    defaults = {**data_defaults(), **unet_defaults(), **diffusion_defaults(), **training_defaults(), **SCRIPT_DEFAULTS}
    parser = argparse.ArgumentParser(description="Train the conditional diffusion UNet of ADDPM.")
    add_dict_to_argparser(parser, defaults, {**DATA_HELP, **HELP, **SCRIPT_HELP})
    return parser


def main(argv=None) -> None:
    args = create_argparser().parse_args(argv)
    logger.reset()
    ctx = dist_util.setup_dist(args.device)
    try:
        # Every flag is checked before the data is read, and a resumed checkpoint before anything
        # is written.
        precision = dist_util.resolve_precision(args.precision, args.use_fp16)
        parse_ema_rates(args.ema_rate)
        unet_flags = args_to_dict(args, unet_defaults().keys())
        diffusion_flags = args_to_dict(args, diffusion_defaults().keys())
        diffusion = create_gaussian_diffusion(learn_sigma=args.learn_sigma, **diffusion_flags)
        with torch.device("meta"):
            create_model(image_size=args.image_size, image_channels=1, **unet_flags)
        training = training_record(args, diffusion.num_timesteps)
        out_dir = resolve_out_dir(args.out_dir, dated_default("addpm"), ctx=ctx)
        resume = resume_path(out_dir, CHECKPOINT_KIND, resume=args.resume, resume_checkpoint=args.resume_checkpoint)

        # The train side of the split that every trainer shares (--val_fraction 0: every case).
        dataset = dataset_from_args(args, subset="train", require_labels=True)
        preprocess = dataset.preprocess
        # One mask channel per class or region (1 for one foreground): the UNet's in/out channels.
        mask_channels = preprocess.num_mask_channels
        preseg = preseg_source(args, preprocess, ctx.device)
        validator = make_validator(args, diffusion, preseg, preprocess, ctx)
        torch.manual_seed(args.seed)
        model = create_model(image_size=args.image_size, image_channels=dataset.num_channels,
                             mask_channels=mask_channels, **unet_flags)
        config = diffusion_checkpoint_config(
            vars(args), image_channels=dataset.num_channels, preprocess=preprocess.to_dict(),
            mask_channels=mask_channels,
        )
        config["training"] = training

        # What the loop logs while it checks its flags and loads a checkpoint is held for log.txt.
        loop = TrainLoop(
            model=model, diffusion=diffusion, dataset=dataset, collate_fn=collate, config=config,
            out_dir=out_dir, ctx=ctx, precision=precision, t_range=training["t_range"],
            preseg_fn=preseg if args.train_start == "preseg" else None, exclusive=preprocess.exclusive,
            validator=validator,
            resume_checkpoint=resume or "", **args_to_dict(args, LOOP_FLAGS),
        )
        open_run_dir(out_dir, ctx)
        logger.log(run_header(args, loop, dataset, training, validator, precision))
        started = time.perf_counter()
        final_path = loop.run()
        logger.log(closing_line(loop, final_path, time.perf_counter() - started))
    finally:
        dist_util.cleanup()


def run_header(args, loop, dataset, training, validator, precision) -> str:
    """The block the trainer prints before its first step (``guided_diffusion.run_report``)."""
    n_params = sum(p.numel() for p in loop.model.parameters())
    total = loop.total_steps
    steps = f"{loop.step} -> {total if total is not None else 'until stopped'}"
    steps += f", global batch {loop.global_batch} = {args.batch_size} x {run_report.processes(loop.ctx.world_size)}"
    best = "best.pt by val addpm Dice, " if validator is not None else ""
    return run_report.header("diffusion training", [
        ("model", f"UNet, {n_params / 1e6:.2f}M parameters, {loop.diffusion.num_timesteps}-step "
                  f"{args.noise_schedule} chain, mask space {args.mask_space}"),
        ("device", f"{loop.device}, {precision}, {run_report.processes(loop.ctx.world_size)}"),
        ("data", f"{args.data_dir}: {len(dataset)} examples with {dataset.num_channels} channel(s) "
                 f"({dataset.layout}){describe_mask(dataset.preprocess)}"),
        ("training", describe_training(training, validator, args)),
        ("steps", steps),
        ("out_dir", f"{loop.out_dir}: diffusion_<step>.pt every {args.save_interval} steps (newest "
                    f"{args.keep_checkpoints} kept), {best}final.pt, progress.csv, curves.png, log.txt"),
    ])


def describe_mask(preprocess) -> str:
    """The header's words on the mask: none for one channel (the header reads as it always
    did), else e.g. ``; mask of 3 channels (regions WT, TC, ET)``."""
    k = preprocess.num_mask_channels
    if k == 1:
        return ""
    kind = "classes" if preprocess.exclusive else "regions"
    return f"; mask of {k} channels ({kind} {', '.join(preprocess.class_names)})"


def closing_line(loop, final_path: str, seconds: float) -> str:
    """The trainer's last line: step, loss, validation, checkpoints (``guided_diffusion.run_report``)."""
    return run_report.training_closing(
        "diffusion training", seconds=seconds, step=loop.step, out_dir=loop.out_dir,
        final_path=final_path or bf.join(loop.out_dir, FINAL_NAME), val_name="val addpm Dice",
        val_score=run_report.last_logged(loop.out_dir, "val_addpm_dice"), best_score=loop.best_val_score,
        best_step=loop.best_step, best_path=bf.join(loop.out_dir, BEST_NAME) if loop.best_step is not None else None)


def training_record(args, num_timesteps: int) -> dict:
    """What the checkpoint records of where and from what the UNet was trained (checked flags)."""
    t_range = parse_t_range(args.t_range, num_timesteps)
    if not 0.0 <= args.t_range_mix <= 1.0:
        raise ConfigError(f"--t_range_mix must lie in [0, 1], got {args.t_range_mix}")
    if args.t_range_mix > 0 and t_range is None:
        raise ConfigError("--t_range_mix needs --t_range LO,HI (without it every batch is on the whole chain)")
    if args.train_start not in TRAIN_STARTS:
        raise ConfigError(f"--train_start {args.train_start!r} is unknown; choose one of {', '.join(TRAIN_STARTS)}")
    if args.train_start == "preseg" and not (args.preseg_path or args.preseg_dir):
        raise ConfigError("--train_start preseg needs --preseg_path (or --preseg_dir)")
    if not 0.0 <= args.preseg_fraction <= 1.0:
        raise ConfigError(f"--preseg_fraction must lie in [0, 1], got {args.preseg_fraction}")
    if args.val_interval < 0:
        raise ConfigError(f"--val_interval must be >= 0, got {args.val_interval}")
    if args.val_interval and not (args.preseg_path or args.preseg_dir):
        raise ConfigError("--val_interval needs --preseg_path (or --preseg_dir): validation runs the truncated sampler")
    return {
        "t_range": list(t_range) if t_range else None,
        "t_range_mix": float(args.t_range_mix) if t_range else 0.0,
        "train_start": args.train_start,
        "preseg_fraction": float(args.preseg_fraction) if args.train_start == "preseg" else 0.0,
    }


def preseg_source(args, preprocess, device):
    """The frozen pre-segmentation, when training or validation needs it (else None)."""
    if args.train_start != "preseg" and not args.val_interval:
        return None
    return PresegSource.from_flags(preseg_path=args.preseg_path, preseg_dir=args.preseg_dir,
                                   preprocess=preprocess, device=device)


def make_validator(args, diffusion, preseg, preprocess, ctx):
    """The validation of ``--val_interval`` on the held-out patients (None when off)."""
    if not args.val_interval:
        return None
    if args.val_final_step not in ("auto", "denoiser", "x0"):
        raise ConfigError(f"--val_final_step {args.val_final_step!r} is unknown; choose auto, denoiser or x0")
    final_step = args.val_final_step
    if final_step == "auto":
        final_step = "denoiser" if args.denoiser_path else "x0"
    denoise_fn, T = None, (args.T if args.T >= 0 else DEFAULT_T)
    if final_step == "denoiser":
        if not args.denoiser_path:
            raise ConfigError("--val_final_step denoiser needs --denoiser_path")
        schedule = {"noise_schedule": args.noise_schedule, "diffusion_steps": args.diffusion_steps,
                    "mask_space": args.mask_space}
        denoise_fn, T = load_final_step(args.denoiser_path, preprocess=preprocess, schedule=schedule,
                                        T=args.T, device=ctx.device)
    try:
        plan = plan_sampler("addpm", num_timesteps=diffusion.num_timesteps, pre_t=args.pre_t, T=T,
                            sampling_steps=args.val_sampling_steps, final_step=final_step)
    except ConfigError as err:
        # The sampler's own message names sample.py's flag; here it is the validation's.
        raise ConfigError(f"validation: {err}".replace("--sampling_steps", "--val_sampling_steps")) from None
    val_set = dataset_from_args(args, subset="val", preprocess=preprocess, require_labels=True)
    return AddpmValidator(
        dataset=val_set, plan=plan, diffusion=diffusion, mask_space=args.mask_space, preseg=preseg,
        mask_channels=preprocess.num_mask_channels, exclusive=preprocess.exclusive,
        channel_names=preprocess.class_names,
        denoise_fn=denoise_fn, max_cases=args.val_max_cases, batch_size=args.val_batch_size, ctx=ctx,
        seed=args.seed, precision=dist_util.resolve_precision(args.precision, args.use_fp16),
        progress=args.progress,
    )


def describe_training(training: dict, validator, args) -> str:
    """One log line: the levels trained on, what x_t is noised from, and the validation."""
    window = training["t_range"]
    levels = "every level of the chain" if window is None else f"levels {window[0]}..{window[1]}"
    if window is not None and training["t_range_mix"]:
        levels += f" ({training['t_range_mix']:g} of every batch on the whole chain)"
    start = "x_t noised from the label"
    if training["train_start"] == "preseg":
        start += f", {training['preseg_fraction']:g} of every batch from the pre-segmentation"
    if validator is None:
        held_out = "no validation (--val_interval 0)"
        if args.val_fraction > 0:
            held_out += (f"; --val_fraction {args.val_fraction:g} of the patients are held out unused: "
                         "pass --preseg_path and --val_interval N to validate on them, or --val_fraction 0")
    else:
        plan = validator.plan
        held_out = (f"validation every {args.val_interval} steps on {len(validator.cases)} cases with addpm "
                    f"{plan.timesteps[0]} -> {plan.timesteps[-1]} ({plan.unet_evaluations} UNet evaluations, "
                    f"final step {plan.final_step}), best.pt by addpm Dice")
    return f"training on {levels}; {start}; {held_out}"


if __name__ == "__main__":
    run_cli(main)
