"""Segment a folder of scans with ADDPM (or a baseline sampler) and score the result.

    python sample.py --data_dir DIR --model_path DIFF.pt --preseg_path PRE.pt \
        --denoiser_path DEN.pt --pre_t 300 --num_ensemble 5 --out_dir OUT

Each network rebuilds from its own checkpoint; the preprocessing is the one recorded in the
diffusion checkpoint. The original ADDPM command also runs as it is:

    python sample.py --data_dir DIR --model_path savedmodel.pt --file_list 0 --pre_t 300 --en_num 0

A raw state dict written by improved-diffusion-based segmentation code loads as the diffusion
model when MODEL_FLAGS and DIFFUSION_FLAGS are given; it samples in the {0,1} mask space the
original ADDPM and Wolleb et al. code trains on (--mask_space pm1 for one trained on {-1,+1}).
``--sampler preseg`` needs no diffusion model: ``--preseg_path`` alone scores the
pre-segmentation net with its own preprocessing. Under torchrun the cases are split across
ranks and rank 0 merges the results. Outputs are listed in README.md ("Outputs of sample.py").
"""

import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import DATA_HELP, Preprocess, collate, create_dataset, data_defaults, preprocess_from_args
from data.precomputed import check_label_map_file, precomputed_preseg_path
from data.preprocess import SINGLE_CHANNEL_MODES
from data.writers import check_label_map_values
from denoiser import load_final_step
from evaluation.outputs import (
    CaseWriter,
    OutputOptions,
    checkpoint_hashes,
    finish_run,
    run_settings,
    select_cases,
)
from evaluation.overlay import overlay_channel
from evaluation.sampling_report import sampling_closing, sampling_header
from evaluation.uncertainty import FUSIONS
from guided_diffusion import dist_util
from guided_diffusion.atomic import check_writable_dir
from guided_diffusion.errors import ConfigError
from guided_diffusion.fast_path import apply_fast_path
from guided_diffusion.loading import load_diffusion_model
from guided_diffusion.script_util import (
    HELP,
    add_dict_to_argparser,
    args_to_dict,
    diffusion_defaults,
    run_cli,
    unet_defaults,
)
from guided_diffusion.seg_sampling import (
    DEFAULT_T,
    PRESEG_SAMPLERS,
    case_generator,
    plan_sampler,
    sample_members,
    untrained_levels_warning,
)
from preseg import PresegSource

# The trainers' default --out_dir, so the original commands chain without extra flags.
DEFAULT_PRESEG_PATH = "runs/preseg/best.pt"
DEFAULT_DENOISER_PATH = "runs/denoiser/best.pt"
# The data flags sampling reads; the preprocessing ones matter only for a raw state dict.
SAMPLE_DATA_FLAGS = ("data_dir", "dataset", "mask_suffix", "num_workers", "image_size", "resize_mode",
                     "label_mode", "foreground_labels", "classes", "regions")

SAMPLE_HELP = {
    "model_path": "diffusion checkpoint from train_addpm.py (or a raw improved-diffusion state dict)",
    "preseg_path": "pre-segmentation checkpoint from train_preseg_network.py",
    "preseg_dir": "folder of pre-segmentations made by any other tool, one file per case "
    "named <case_id>.nii.gz (NIfTI inputs) or <case_id>.png (image inputs); replaces --preseg_path",
    "denoiser_path": "one-step denoising checkpoint from train_denoising_network.py",
    "use_ema": "use the EMA weights of the diffusion checkpoint (the first --ema_rate) when present",
    "sampler": "addpm (truncated reverse process + denoiser), ddpm (all steps from noise), "
    "ddim (--sampling_steps K from noise), preseg (the pre-segmentation alone)",
    "pre_t": "level at which the noised pre-segmentation enters the reverse process",
    "T": "level where the truncated process ends, >= 0; -1 = the denoiser checkpoint's T "
    "(a different value is refused); 250 when --final_step x0 without a denoiser",
    "sampling_steps": "UNet evaluations per member: addpm spaces them inside [pre_t, T], "
    "ddim from pure noise, ddpm respaces the chain; 0 = every step",
    "step_method": "how the truncated addpm segment moves between spaced levels: ddpm (posterior) or ddim",
    "eta": "DDIM noise scale (0 = deterministic)",
    "final_step": "how addpm maps x_T to the mask: denoiser (the one-step net) or x0 (the UNet's own prediction)",
    "num_ensemble": "samples per image, run as one batch and fused",
    "en_num": "the original code's ensemble index: here an offset to --seed, so runs with "
    "different --en_num draw independent samples",
    "fusion": "how ensemble members are fused: mean (of probabilities) or vote (majority)",
    "file_list": "cases to run: comma-separated indices or case ids (empty = all)",
    "batch_size": "images per batch (each runs --num_ensemble members)",
    "out_dir": "where masks, uncertainty maps, overlays, metrics.csv and summary.json go",
    "save_preseg": "also write the pre-segmentation of every case",
    "save_overlays": "write overlays/<case_id>.png",
    "overlay_channel": "the image channel the overlays show: a channel name (e.g. flair, as the data names "
    "it) or an index; empty = the channel named FLAIR where there is one, else 0",
    "overwrite": "recompute cases whose results already exist, also when --out_dir holds results "
    "of other settings (refused otherwise)",
    "seed": "seed of the sampling noise: each batch draws from a torch.Generator seeded by --seed, --en_num and its case ids",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "precision": "fp32, bf16 or fp16 (CUDA) autocast for the networks",
    "progress_steps": "show a progress bar over the reverse steps too",
    "fast_path": "the UNet's fast path (channels_last; SDPA attention except on CPU); False = "
    "guided-diffusion's computation, the same results within float tolerance",
    "compile": "torch.compile the UNet for the reverse loop (pays off on long runs; runs eagerly "
    "where compilation fails)",
}
# A raw state dict records nothing; the original ADDPM and Wolleb et al. code trains on {0,1}.
RAW_MASK_SPACE = "01"
RAW_MASK_SPACE_HELP = (
    "only for a raw state dict (our checkpoints record their own): the mask space it was trained "
    "in; 01 ({0,1}, as the original ADDPM and Wolleb et al. code trains) or pm1 ({-1,+1})"
)


def sample_defaults():
    return dict(
        model_path="", preseg_path=DEFAULT_PRESEG_PATH, preseg_dir="",
        denoiser_path=DEFAULT_DENOISER_PATH, use_ema=True,
        sampler="addpm", pre_t=300, T=-1, sampling_steps=0, step_method="ddpm", eta=0.0,
        final_step="denoiser", num_ensemble=5, en_num=0, fusion="mean", file_list="",
        batch_size=1, out_dir="samples", save_preseg=False, save_overlays=True, overlay_channel="",
        overwrite=False, seed=0, device="auto", precision="fp32", progress_steps=False, fast_path=True,
        compile=False,
    )


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="The UNet and diffusion flags (MODEL_FLAGS, DIFFUSION_FLAGS) and --image_size, "
        "--resize_mode, --label_mode, --foreground_labels, --classes, --regions are read only when "
        "--model_path is a raw state dict (the preprocessing flags also for --sampler preseg "
        "--preseg_dir without --model_path); a checkpoint of train_addpm.py records its own.",
    )
    data_flags = {k: v for k, v in data_defaults().items() if k in SAMPLE_DATA_FLAGS}
    add_dict_to_argparser(parser, data_flags, DATA_HELP)
    add_dict_to_argparser(parser, sample_defaults(), SAMPLE_HELP)
    # Only read for a raw state dict; our checkpoints carry their own model and preprocessing flags.
    add_dict_to_argparser(parser, unet_defaults(), HELP)
    add_dict_to_argparser(parser, {**diffusion_defaults(), "mask_space": RAW_MASK_SPACE},
                          {**HELP, "mask_space": RAW_MASK_SPACE_HELP})
    return parser


def main():
    args = create_argparser().parse_args()
    check_flags(args)
    ctx = dist_util.setup_dist(args.device)
    bundle = load_diffusion_source(args, ctx)
    preseg, preprocess = load_preseg_source(args, bundle, ctx.device)
    denoise_fn, T = final_step(args, bundle, preprocess, ctx.device)
    plan = plan_sampler(
        args.sampler, num_timesteps=bundle.diffusion.num_timesteps if bundle else 0, pre_t=args.pre_t,
        T=T, sampling_steps=args.sampling_steps, step_method=args.step_method, eta=args.eta,
        final_step=args.final_step, timestep_respacing=args.timestep_respacing,
    )
    warning = untrained_levels_warning(plan, bundle.config.get("training"), args.model_path) if bundle else ""
    if warning and ctx.is_main:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    num_members = 1 if plan.sampler == "preseg" else args.num_ensemble
    diffusion, model, mask_space = (bundle.diffusion, bundle.model, bundle.mask_space) if bundle else (None,) * 3
    if model is not None:
        model = apply_fast_path(model, ctx.device, enabled=args.fast_path, compile=args.compile)

    dataset = create_dataset(
        args.data_dir, dataset=args.dataset, preprocess=preprocess, subset="all",
        mask_suffix=args.mask_suffix, keep_original_label=True,
    )
    if args.preseg_dir and preseg is not None:
        # Label-map files are read with the dataset's classes (filled in from its labels).
        preseg = PresegSource.from_flags(preseg_dir=args.preseg_dir, preprocess=dataset.preprocess,
                                         device=ctx.device)
    mask_channels, exclusive = check_mask_channels(bundle, dataset.preprocess, args.model_path)
    check_label_maps_fit(dataset)
    selected = select_cases(dataset, args.file_list)
    checkpoints = checkpoint_hashes(bundle, plan, preseg_path=args.preseg_path, preseg_dir=args.preseg_dir,
                                    denoiser_path=args.denoiser_path)
    options = output_options(args)
    settings = run_settings(options, plan, num_members=num_members, preprocess=dataset.preprocess,
                            mask_space=mask_space, checkpoints=checkpoints)
    channel = overlay_channel(args.overlay_channel, dataset.channel_names)
    writer = CaseWriter(options, dataset, plan, dataset.preprocess, num_members, ctx, settings=settings,
                        checkpoints=checkpoints, overlay_channel=channel)
    writer.check_out_dir()
    mine = selected[ctx.rank :: ctx.world_size]
    todo = [i for i in mine if args.overwrite or not writer.is_done(i)]
    check_preseg_dir(args, plan, dataset, todo)
    if ctx.is_main:
        print(sampling_header(options=options, data_dir=args.data_dir, plan=plan, dataset=dataset, ctx=ctx,
                              num_members=num_members, n_selected=len(selected),
                              n_todo=len(selected) - len(mine) + len(todo), checkpoints=checkpoints,
                              overlay_channel=channel), flush=True)
    started = time.perf_counter()
    writer.start()
    loader = DataLoader(
        Subset(dataset, todo), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, collate_fn=collate,
    )
    autocast = dist_util.autocast_context(ctx.device, args.precision)
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"{plan.sampler} sampling", disable=not ctx.is_main, unit="batch"):
            start = time.perf_counter()
            images = batch["image"].to(ctx.device)
            generator = case_generator(args.seed, args.en_num, batch["case_id"], ctx.device)
            with autocast:
                preseg_probs = preseg(batch) if preseg is not None else None
                members = sample_members(
                    plan, diffusion=diffusion, model=model, images=images,
                    num_ensemble=num_members, mask_space=mask_space, preseg_probs=preseg_probs,
                    denoise_fn=denoise_fn, generator=generator, progress=args.progress_steps and ctx.is_main,
                    mask_channels=mask_channels, exclusive=exclusive,
                )
            members = members.float().cpu()
            seconds = (time.perf_counter() - start) / len(batch["case_id"])
            for i in range(len(batch["case_id"])):
                preseg_prob = None if preseg_probs is None else preseg_probs[i].float().cpu()
                writer.write_case(batch, i, members[i], preseg_prob, seconds)
    dist_util.barrier()
    if ctx.is_main:
        summary = finish_run(writer, selected)
        print(sampling_closing(summary, args.out_dir, time.perf_counter() - started,
                               save_overlays=args.save_overlays), flush=True)
    dist_util.cleanup()


def check_flags(args):
    """Flags that would otherwise fail only after the first batch has been sampled."""
    if args.fusion not in FUSIONS:
        raise ConfigError(f"--fusion {args.fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ConfigError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.T < -1:
        raise ConfigError(f"--T {args.T}: give a level >= 0, or -1 for the denoiser checkpoint's T")
    if not args.model_path and args.sampler != "preseg":
        raise ConfigError(f"--model_path is required for --sampler {args.sampler} (a diffusion checkpoint "
                          "from train_addpm.py); only --sampler preseg runs without one")
    check_writable_dir(args.out_dir, "--out_dir")


def check_mask_channels(bundle, preprocess, model_path):
    """(K, exclusive) of the run's label mode; a diffusion model of another K is refused."""
    channels = preprocess.num_mask_channels
    recorded = int(bundle.config.get("mask_channels", 1)) if bundle else channels
    if recorded != channels:
        raise ConfigError(f"{model_path} has {recorded} mask channels, but its preprocessing "
                          f"({preprocess.label_mode} {preprocess.describe_labels()}) gives {channels}")
    return channels, preprocess.exclusive


def check_label_maps_fit(dataset):
    """Refuse, before anything is written, label values that the outputs' format cannot hold."""
    preprocess = dataset.preprocess
    if preprocess.label_mode in SINGLE_CHANNEL_MODES:
        return
    largest = max(value for _, value in preprocess.paint_order())
    check_label_map_values(largest, dataset.item_format, f"{preprocess.label_mode} labels "
                           f"{preprocess.describe_labels()} for the images of {dataset.root}")


def output_options(args):
    """The flags that shape what the run writes, for evaluation.outputs."""
    return OutputOptions(
        out_dir=args.out_dir, fusion=args.fusion, seed=args.seed, en_num=args.en_num,
        precision=args.precision, batch_size=args.batch_size, save_preseg=args.save_preseg,
        save_overlays=args.save_overlays, overwrite=args.overwrite,
    )


def _preprocess_and_channels(preprocess):
    # --label_mode multiclass or regions without their values: the dataset gives them (0 here).
    return preprocess.to_dict(), preprocess.num_mask_channels or None


def load_diffusion_source(args, ctx):
    """The diffusion model; None for --sampler preseg without --model_path."""
    if not args.model_path:
        return None
    bundle = load_diffusion_model(
        args.model_path, ctx.device, use_ema=args.use_ema,
        raw_flags=args_to_dict(args, [*unet_defaults(), *diffusion_defaults()]),
        # The data flags describe a raw state dict's preprocessing (data/ builds it).
        raw_preprocess=lambda: _preprocess_and_channels(preprocess_from_args(args)),
    )
    if is_raw(bundle) and ctx.is_main:
        print(f"note: {args.model_path} is a raw state dict: sampling with --mask_space {bundle.mask_space} "
              f"(the default 01 is the original ADDPM / Wolleb et al. code's {{0,1}} masks; pass "
              "--mask_space pm1 for a model trained on {-1,+1})", flush=True)
    return bundle


def load_preseg_source(args, bundle, device):
    """(pre-segmentation source or None when the sampler needs none, the preprocessing of the run).

    The preprocessing is the diffusion model's; without one (--sampler preseg), the
    pre-segmentation checkpoint's, or for --preseg_dir masks the data flags'.
    """
    if args.preseg_dir and args.preseg_path != DEFAULT_PRESEG_PATH:
        raise ConfigError("give --preseg_path or --preseg_dir, not both")
    preprocess = Preprocess.from_dict(bundle.config["preprocess"]) if bundle else None
    if args.sampler not in PRESEG_SAMPLERS:
        return None, preprocess
    if args.preseg_dir and preprocess is None:
        preprocess = preprocess_from_args(args)
    source = PresegSource.from_flags(
        preseg_path="" if args.preseg_dir else args.preseg_path, preseg_dir=args.preseg_dir,
        preprocess=preprocess, preprocess_from_flags=is_raw(bundle), device=device,
    )
    return source, source.preprocess


def final_step(args, bundle, preprocess, device):
    """(denoise_fn or None, T): the map from x_T to the mask and the level it expects."""
    if args.sampler != "addpm" or args.final_step != "denoiser":
        return None, (args.T if args.T >= 0 else DEFAULT_T)
    return load_final_step(args.denoiser_path, preprocess=preprocess, schedule=bundle.schedule,
                           T=args.T, device=device, preprocess_from_flags=is_raw(bundle))


def is_raw(bundle) -> bool:
    """True for a raw state dict: it records no preprocessing, the data flags give it."""
    return bundle is not None and bundle.weights == "raw"


def check_preseg_dir(args, plan, dataset, todo):
    """Fail before any sampling when --preseg_dir lacks a case, or (classes, regions) holds a
    label value they do not cover: one line, nothing written."""
    if not args.preseg_dir or not plan.needs_preseg:
        return
    if not os.path.isdir(args.preseg_dir):
        raise ConfigError(f"--preseg_dir {args.preseg_dir}: no such folder")
    # The input's format and the case (or volume) id decide the file name; no item needs loading.
    case_ids, groups = dataset.case_ids, dataset.group_ids
    paths = {}
    for index in todo:
        volume_id = dataset.records[groups[index]].volume_id if groups else None
        meta = {"format": dataset.item_format, "volume_id": volume_id}
        paths[precomputed_preseg_path(args.preseg_dir, case_ids[index], meta)] = None
    if dataset.preprocess.label_mode not in SINGLE_CHANNEL_MODES:
        for path in paths:
            check_label_map_file(path, dataset.preprocess)


if __name__ == "__main__":
    run_cli(main)
