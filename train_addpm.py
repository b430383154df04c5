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
``--max_steps`` is the total. A non-finite loss stops the run with one line naming the last
good checkpoint.

Several GPUs (or CPU processes, with gloo)::

    torchrun --standalone --nproc_per_node 4 train_addpm.py --data_dir DIR ...

Each process takes its own ``--batch_size`` examples per step, so the global batch is
``batch_size * nproc`` (``--batch_size 1`` on 4 GPUs matches the original batch of 4); rank 0
writes. A resume with the same number of processes is bit-identical to an uninterrupted run;
with another number it continues at the same sample of the same data order, with other noise.
"""

import argparse

import torch

from data import DATA_HELP, collate, data_defaults, dataset_from_args
from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import newest_checkpoint
from guided_diffusion.errors import ConfigError
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
from guided_diffusion.train_util import TrainLoop, existing_checkpoint, parse_ema_rates, resolve_out_dir

SCRIPT_DEFAULTS = dict(out_dir="", resume="", keep_checkpoints=3, progress=True)
SCRIPT_HELP = {
    "out_dir": "folder for checkpoints and logs; empty = $OPENAI_LOGDIR, else ./runs/addpm-<date-time>",
    "resume": "auto = continue from the newest checkpoint in --out_dir (start fresh if there is none); empty = no",
    "keep_checkpoints": "how many diffusion_<step>.pt files to keep (final.pt is kept besides)",
    "progress": "show a progress bar",
}


def create_argparser() -> argparse.ArgumentParser:
    defaults = {**data_defaults(), **unet_defaults(), **diffusion_defaults(), **training_defaults(), **SCRIPT_DEFAULTS}
    parser = argparse.ArgumentParser(description="Train the conditional diffusion UNet of ADDPM.")
    add_dict_to_argparser(parser, defaults, {**DATA_HELP, **HELP, **SCRIPT_HELP})
    return parser


def resume_path(args, out_dir: str) -> str:
    """The checkpoint to resume from ("" for a fresh start), from --resume / --resume_checkpoint."""
    if args.resume not in ("", "auto"):
        raise ConfigError(
            f"--resume {args.resume!r}: expected auto or nothing (use --resume_checkpoint PATH for a file)"
        )
    auto = args.resume == "auto" or args.resume_checkpoint == "auto"
    if auto and args.resume_checkpoint not in ("", "auto"):
        raise ConfigError("--resume auto and --resume_checkpoint PATH exclude each other; give one")
    if not auto:
        if not args.resume_checkpoint:
            found = existing_checkpoint(out_dir)
            if found:
                raise ConfigError(
                    f"--out_dir {out_dir} already holds {found}: pass --resume auto to continue, or another --out_dir"
                )
        return args.resume_checkpoint
    return newest_checkpoint(out_dir, kind="diffusion") or ""


def main(argv=None) -> None:
    args = create_argparser().parse_args(argv)
    ctx = dist_util.setup_dist(args.device)
    try:
        # Every flag is checked before the data is read and before anything is written.
        precision = dist_util.resolve_precision(args.precision, args.use_fp16)
        parse_ema_rates(args.ema_rate)
        unet_flags = args_to_dict(args, unet_defaults().keys())
        diffusion_flags = args_to_dict(args, diffusion_defaults().keys())
        diffusion = create_gaussian_diffusion(learn_sigma=args.learn_sigma, **diffusion_flags)
        with torch.device("meta"):
            create_model(image_size=args.image_size, image_channels=1, **unet_flags)
        out_dir = resolve_out_dir(args.out_dir, ctx)
        resume = resume_path(args, out_dir)

        # The train side of the split that every trainer shares (--val_fraction 0: every case).
        dataset = dataset_from_args(args, subset="train", require_labels=True)
        torch.manual_seed(args.seed)
        model = create_model(image_size=args.image_size, image_channels=dataset.num_channels, **unet_flags)
        config = diffusion_checkpoint_config(
            args, image_channels=dataset.num_channels, preprocess=dataset.preprocess.to_dict()
        )

        logger.configure(dir=out_dir, rank=ctx.rank)
        logger.log(f"data: {len(dataset)} examples with {dataset.num_channels} channel(s) from {args.data_dir}")
        logger.log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; out_dir: {out_dir}")
        if "auto" in (args.resume, args.resume_checkpoint) and not resume:
            logger.log(f"--resume auto: no checkpoint in {out_dir} yet, starting fresh")
        TrainLoop(
            model=model,
            diffusion=diffusion,
            dataset=dataset,
            collate_fn=collate,
            config=config,
            out_dir=out_dir,
            ctx=ctx,
            batch_size=args.batch_size,
            microbatch=args.microbatch,
            lr=args.lr,
            weight_decay=args.weight_decay,
            ema_rate=args.ema_rate,
            lr_anneal_steps=args.lr_anneal_steps,
            max_steps=args.max_steps,
            grad_clip=args.grad_clip,
            precision=precision,
            schedule_sampler=args.schedule_sampler,
            log_interval=args.log_interval,
            save_interval=args.save_interval,
            keep_checkpoints=args.keep_checkpoints,
            resume_checkpoint=resume,
            mask_space=args.mask_space,
            seed=args.seed,
            num_workers=args.num_workers,
            progress=args.progress,
        ).run()
    finally:
        dist_util.cleanup()


if __name__ == "__main__":
    run_cli(main)
