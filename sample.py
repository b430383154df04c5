"""Segment a folder of scans with ADDPM (or a baseline sampler) and score the result.

    python sample.py --data_dir DIR --model_path DIFF.pt --preseg_path PRE.pt \
        --denoiser_path DEN.pt --pre_t 300 --num_ensemble 5 --out_dir OUT

Each network rebuilds from its own checkpoint; the preprocessing is the one recorded in the
diffusion checkpoint. The original ADDPM command also runs as it is:

    python sample.py --data_dir DIR --model_path savedmodel.pt --file_list 0 --pre_t 300 --en_num 0

A raw state dict written by improved-diffusion-based segmentation code loads as the diffusion
model when MODEL_FLAGS and DIFFUSION_FLAGS are given (and --mask_space 01 for models trained on
{0,1} masks). Under torchrun the cases are split across ranks and rank 0 merges the results.
Outputs are listed in README.md ("Outputs of sample.py").
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import DATA_HELP, Preprocess, collate, create_dataset, data_defaults
from denoiser import check_denoiser_matches, denoiser_input, load_denoiser
from evaluation.outputs import CaseWriter, finish_run, select_cases
from guided_diffusion import dist_util
from guided_diffusion.errors import ConfigError
from guided_diffusion.sampling_setup import load_diffusion_model
from guided_diffusion.script_util import (
    HELP,
    add_dict_to_argparser,
    diffusion_defaults,
    run_cli,
    unet_defaults,
)
from guided_diffusion.seg_sampling import plan_sampler, sample_members
from preseg import load_preseg, read_precomputed_preseg, preseg_probabilities

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
    "T": "level where the truncated process ends; -1 = the denoiser checkpoint's T "
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
    "overwrite": "recompute cases whose results already exist",
    "seed": "seed of the sampling noise (explicit torch.Generator)",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "precision": "fp32, bf16 or fp16 (CUDA) autocast for the networks",
    "progress_steps": "show a progress bar over the reverse steps too",
}


def sample_defaults():
    return dict(
        model_path="", preseg_path="", preseg_dir="", denoiser_path="", use_ema=True,
        sampler="addpm", pre_t=300, T=-1, sampling_steps=0, step_method="ddpm", eta=0.0,
        final_step="denoiser", num_ensemble=5, en_num=0, fusion="mean", file_list="",
        batch_size=1, out_dir="samples", save_preseg=False, save_overlays=True, overwrite=False,
        seed=0, device="auto", precision="fp32", progress_steps=False,
    )


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(parser, data_defaults(), DATA_HELP)
    add_dict_to_argparser(parser, sample_defaults(), SAMPLE_HELP)
    # Only read for a raw state dict; our checkpoints carry their own model flags.
    add_dict_to_argparser(parser, unet_defaults(), HELP)
    add_dict_to_argparser(parser, diffusion_defaults(), HELP)
    return parser


def main():
    args = create_argparser().parse_args()
    ctx = dist_util.setup_dist(args.device)
    bundle = load_diffusion_model(args, ctx.device)
    preprocess = Preprocess.from_dict(bundle.config["preprocess"])

    preseg_net = None
    if args.sampler in ("addpm", "preseg"):
        if args.preseg_path and args.preseg_dir:
            raise ConfigError("give --preseg_path or --preseg_dir, not both")
        if args.preseg_path:
            preseg_net, preseg_config = load_preseg(args.preseg_path, ctx.device)
            check_same_preprocess(preseg_config, preprocess, args.preseg_path)
        elif not args.preseg_dir:
            raise ConfigError(f"--sampler {args.sampler} needs --preseg_path or --preseg_dir")

    denoise_fn, T = None, args.T
    if args.sampler == "addpm" and args.final_step == "denoiser":
        if not args.denoiser_path:
            raise ConfigError("--final_step denoiser needs --denoiser_path (or use --final_step x0)")
        den_net, den_config = load_denoiser(args.denoiser_path, ctx.device)
        check_same_preprocess(den_config, preprocess, args.denoiser_path)
        T = den_config["T"] if args.T < 0 else args.T
        check_denoiser_matches(den_config, T=T, source=args.denoiser_path, **bundle.schedule)
        denoise_fn = make_denoise_fn(den_net, den_config)
    elif T < 0:
        T = 250

    plan = plan_sampler(
        args.sampler, num_timesteps=bundle.diffusion.num_timesteps, pre_t=args.pre_t, T=T,
        sampling_steps=args.sampling_steps, step_method=args.step_method, eta=args.eta,
        final_step=args.final_step,
    )
    if args.num_ensemble < 1:
        raise ConfigError(f"--num_ensemble must be >= 1, got {args.num_ensemble}")
    num_members = 1 if plan.sampler == "preseg" else args.num_ensemble

    dataset = create_dataset(
        args.data_dir, dataset=args.dataset, preprocess=preprocess, subset="all",
        mask_suffix=args.mask_suffix,
    )
    selected = select_cases(dataset, args.file_list)
    writer = CaseWriter(args, dataset, plan, bundle, preprocess, num_members, ctx)
    todo = [i for i in selected[ctx.rank :: ctx.world_size] if args.overwrite or not writer.is_done(i)]
    loader = DataLoader(
        Subset(dataset, todo), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, collate_fn=collate,
    )
    generator = torch.Generator(device=ctx.device).manual_seed(args.seed + args.en_num + 1000 * ctx.rank)
    autocast = dist_util.autocast_context(ctx.device, args.precision)
    for batch in tqdm(loader, desc=f"{plan.sampler} sampling", disable=not ctx.is_main, unit="batch"):
        start = time.perf_counter()
        images = batch["image"].to(ctx.device)
        if plan.sampler in ("addpm", "preseg"):
            if preseg_net is not None:
                with autocast:
                    preseg_probs = preseg_probabilities(preseg_net, images)
            else:
                preseg_probs = torch.stack(
                    [read_precomputed_preseg(args.preseg_dir, cid, meta) for cid, meta in zip(batch["case_id"], batch["meta"])]
                ).to(ctx.device)
        else:
            preseg_probs = None
        with autocast:
            members = sample_members(
                plan, diffusion=bundle.diffusion, model=bundle.model, images=images,
                num_ensemble=num_members, mask_space=bundle.mask_space, preseg_probs=preseg_probs,
                denoise_fn=denoise_fn, generator=generator, progress=args.progress_steps and ctx.is_main,
            )
        members = members.float().cpu()
        seconds = (time.perf_counter() - start) / len(batch["case_id"])
        for i in range(len(batch["case_id"])):
            writer.write_case(
                batch, i, members[i],
                None if preseg_probs is None else preseg_probs[i, 0].float().cpu(),
                seconds,
            )
    dist_util.barrier()
    if ctx.is_main:
        finish_run(writer, selected)
    dist_util.cleanup()


def make_denoise_fn(net, config):
    """The denoising net as a map x_T [N,1,H,W], images [N,C,H,W] -> probabilities [N,1,H,W]."""

    def denoise(x_T, images):
        logits = net(denoiser_input(x_T, images, config["denoiser_cond"]))
        return torch.softmax(logits.float(), dim=1)[:, 1:2]

    return denoise


def check_same_preprocess(config, preprocess, path):
    """The three nets must see the same grid: a mask from one is fed to the next."""
    other = Preprocess.from_dict(config["preprocess"])
    for name in ("image_size", "resize_mode"):
        if getattr(other, name) != getattr(preprocess, name):
            raise ConfigError(
                f"{path} was trained with {name}={getattr(other, name)}, but the diffusion model "
                f"with {name}={getattr(preprocess, name)}; train all three networks on one grid"
            )


if __name__ == "__main__":
    run_cli(main)
