"""Seconds per image of every sampler on the same UNet weights and input, as one table of ratios.

    python -m benchmarks.bench_sampling [--config small|default|both] [--device auto]
        [--repeats 1] [--seed 0] [--threads 2] [--clock wall|process]
        [--ddpm_steps_measured N] [--max_evals_measured N]

Configurations (4 image channels, one mask channel, random weights with the UNet's zero-initialised
output conv re-initialised to small values, a random image and a random pre-segmentation):

- small:   64x64, 32 base channels, otherwise the original ADDPM model;
- default: the original ADDPM README's model and diffusion (256x256, 128 channels, 2 res
  blocks, 1 head, attention at 16, no scale-shift norm, cosine schedule, 1000 steps).

Rows, all on one image and measured in the same process: the bare UNet forward (the floor, at
batch 1 and at batch K), ddpm (1000 steps, Wolleb), ddim (100 steps), addpm (pre_t 300 -> T 250,
then a small denoising net from ``preseg.build_network``), addpm with 10 spaced steps, and an
addpm ensemble of K = 5 members run as one batch against five sequential runs.

Every sampler row runs ``seg_sampling.sample_members``, the function ``sample.py`` uses, over n
loop evaluations; less the fixed cost (the denoising net, timed on its own) this gives the time
per loop evaluation, compared with a bare forward at the same batch size. Where n is below the
plan's evaluations (``--ddpm_steps_measured``, ``--max_evals_measured``) the total is
extrapolated as fixed + evaluations x per-evaluation time, and the row is marked with ``*``.
By default everything is measured in full, except on CPU: ddpm measures 200 steps at the small
config, and every row measures 3 evaluations at the default config (one forward there takes
seconds). On a CPU shared with other jobs, ``--threads 1 --clock process`` times the process's
own CPU time, which other jobs barely disturb.
"""

import argparse
import dataclasses
import math
import time

import torch

from denoiser import denoiser_input
from guided_diffusion import dist_util
from guided_diffusion.gaussian_diffusion import build_model_input
from guided_diffusion.script_util import create_model_and_diffusion, diffusion_defaults, run_cli, unet_defaults
from guided_diffusion.seg_sampling import plan_sampler, sample_members
from preseg import build_network, foreground_probability

IMAGE_CHANNELS = 4
ENSEMBLE = 5
PRE_T, T = 300, 250
ORIGINAL_FLAGS = dict(
    num_channels=128, num_res_blocks=2, num_heads=1, learn_sigma=False, use_scale_shift_norm=False,
    attention_resolutions="16", diffusion_steps=1000, noise_schedule="cosine",
    rescale_learned_sigmas=False, rescale_timesteps=False,
)
CONFIGS = {
    "small": dict(image_size=64, flags={**ORIGINAL_FLAGS, "num_channels": 32}),
    "default": dict(image_size=256, flags=dict(ORIGINAL_FLAGS)),
}
# Targets: truncation pays off, batching members pays off on CPU, and the
# loop adds little to the UNet itself.
ADDPM_SPEEDUP_TARGET = 18.0
ENSEMBLE_SPEEDUP_TARGET = 1.5
LOOP_OVERHEAD_TARGET = 0.15
CPU_MEASURED = {"small": {"ddpm": 200, "other": 0}, "default": {"ddpm": 3, "other": 3}}
# "wall": elapsed time. "process": CPU time of this process, which on a shared machine is the
# better estimate of the elapsed time on an idle one (exact with --threads 1; with more
# threads it also counts the time they spend waiting for each other).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int, clock=time.perf_counter) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (seconds), the device synchronised."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = clock()
        fn()
        sync(device)
        best = min(best, clock() - start)
    return best


class Bench:
    """The model, diffusion, denoiser and input of one configuration, and the timed rows."""

    def __init__(self, name: str, device: torch.device, seed: int, repeats: int, clock: str):
        spec = CONFIGS[name]
        self.name, self.device, self.seed, self.repeats = name, device, seed, repeats
        self.clock = CLOCKS[clock]
        self.size = spec["image_size"]
        flags = {**unet_defaults(), **diffusion_defaults(), **spec["flags"]}
        torch.manual_seed(seed)
        model, self.diffusion = create_model_and_diffusion(
            image_size=self.size, image_channels=IMAGE_CHANNELS, **flags
        )
        # The output conv starts at zero (improved-diffusion); small weights keep eps non-zero.
        torch.nn.init.normal_(model.out[-1].weight, std=0.02)
        self.model = model.to(device).eval()
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        net = build_network("unet", in_channels=1, num_classes=2, base_channels=16, depth=3)
        self.denoiser = net.to(device).eval()
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(1, IMAGE_CHANNELS, self.size, self.size, generator=g).to(device)
        self.preseg = (torch.rand(1, 1, self.size, self.size, generator=g) > 0.7).float().to(device)

    def denoise(self, x_T: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return foreground_probability(self.denoiser(denoiser_input(x_T, None, "none")))

    def forward_time(self, batch: int, evaluations: int) -> float:
        """Seconds per bare UNet forward at ``batch`` on a prebuilt input (the floor)."""
        image = self.image.expand(batch, -1, -1, -1)
        x = torch.randn(batch, 1, self.size, self.size, device=self.device)
        inp = build_model_input(image, x)
        t = self.diffusion.scale_timesteps(torch.full((batch,), PRE_T, device=self.device, dtype=torch.long))

        def run(n):
            for _ in range(n):
                self.model(inp, t)

        run(1)
        return best_time(lambda: run(evaluations), self.device, self.repeats, self.clock) / evaluations

    def denoise_time(self, batch: int) -> float:
        """Seconds per call of the final denoising step at ``batch`` (the fixed cost of addpm)."""
        x_T = torch.randn(batch, 1, self.size, self.size, device=self.device)
        self.denoise(x_T, None)
        return best_time(lambda: self.denoise(x_T, None), self.device, max(self.repeats, 5), self.clock)

    def sampler_time(self, plan, *, members: int, calls: int, measured: int) -> dict:
        """Time ``calls`` runs of ``plan`` with ``members`` members each (one image).

        The loop's cost is the run's time less its fixed cost (the denoising net, timed on its
        own; the start state is one ``randn`` and ``q_sample``), per loop evaluation.

        :param measured: loop evaluations to time (0 = all); fewer -> extrapolated.
        :return: dict with ``seconds`` (all calls), ``per_eval`` (seconds per loop
            evaluation of one call), ``measured`` and ``extrapolated``.
        """
        total = len(plan.timesteps) - 1
        n = total if measured <= 0 else min(measured, total)

        def run(k):
            sub = dataclasses.replace(plan, timesteps=plan.timesteps[: k + 1])
            for call in range(calls):
                generator = torch.Generator(device=self.device).manual_seed(self.seed + call)
                sample_members(
                    sub, diffusion=self.diffusion, model=self.model, images=self.image,
                    num_ensemble=members, mask_space="pm1", preseg_probs=self.preseg,
                    denoise_fn=self.denoise, generator=generator,
                )

        run(1)
        fixed = self.denoise_time(members) * calls if plan.final_step == "denoiser" else 0.0
        seconds = best_time(lambda: run(n), self.device, self.repeats, self.clock)
        per_eval = max(seconds - fixed, 0.0) / n
        return {
            "seconds": seconds + (total - n) * per_eval,
            "per_eval": per_eval / calls,
            "measured": n,
            "extrapolated": n < total,
        }


def run_config(name: str, device: torch.device, args) -> tuple[list, dict]:
    """All rows of one configuration, and its targets."""
    bench = Bench(name, device, args.seed, args.repeats, args.clock)
    n_steps = bench.diffusion.num_timesteps
    auto = CPU_MEASURED[name] if device.type == "cpu" else {"ddpm": 0, "other": 0}
    ddpm_measured = auto["ddpm"] if args.ddpm_steps_measured is None else args.ddpm_steps_measured
    other_measured = auto["other"] if args.max_evals_measured is None else args.max_evals_measured
    forward_evals = 20 if other_measured <= 0 else max(1, min(20, other_measured))

    def floors():
        return {b: bench.forward_time(b, forward_evals) for b in (1, ENSEMBLE)}

    plans = {
        "ddpm": plan_sampler("ddpm", num_timesteps=n_steps),
        "ddim": plan_sampler("ddim", num_timesteps=n_steps, sampling_steps=100),
        "addpm": plan_sampler("addpm", num_timesteps=n_steps, pre_t=PRE_T, T=T),
        "addpm10": plan_sampler("addpm", num_timesteps=n_steps, pre_t=PRE_T, T=T, sampling_steps=10),
    }
    specs = [
        ("ddpm-1000", plans["ddpm"], 1, 1, ddpm_measured),
        ("ddim-100", plans["ddim"], 1, 1, other_measured),
        (f"addpm {PRE_T}->{T}", plans["addpm"], 1, 1, other_measured),
        (f"addpm {PRE_T}->{T} 10 steps", plans["addpm10"], 1, 1, other_measured),
        (f"addpm K={ENSEMBLE} batched", plans["addpm"], ENSEMBLE, 1, other_measured),
        (f"addpm K={ENSEMBLE} sequential", plans["addpm"], 1, ENSEMBLE, other_measured),
    ]
    before = floors()
    results = [(spec, bench.sampler_time(spec[1], members=spec[2], calls=spec[3], measured=spec[4]))
               for spec in specs]
    after = floors()
    # The floor is timed before and after the sampler rows and averaged, so that a machine
    # whose load drifts during the run does not favour either side.
    fwd = {b: 0.5 * (before[b] + after[b]) for b in before}
    rows = [
        dict(config=name, row="unet forward (floor)", batch=1, forwards=1, seconds=fwd[1],
             per_eval=fwd[1], floor=fwd[1], measured="", extrapolated=False),
        dict(config=name, row=f"unet forward x{ENSEMBLE} batch", batch=ENSEMBLE, forwards=1,
             seconds=fwd[ENSEMBLE], per_eval=fwd[ENSEMBLE], floor=fwd[ENSEMBLE], measured="",
             extrapolated=False),
    ]
    for (label, plan, members, calls, _), result in results:
        rows.append(dict(
            config=name, row=label, batch=members, forwards=plan.unet_evaluations * calls,
            seconds=result["seconds"], per_eval=result["per_eval"], floor=fwd[members],
            measured=f"{result['measured']}/{plan.unet_evaluations}", extrapolated=result["extrapolated"],
        ))
    ddpm_seconds = rows[2]["seconds"]
    for row in rows:
        row["speedup"] = ddpm_seconds / row["seconds"]
        row["overhead"] = row["per_eval"] / row["floor"] - 1.0
    by_name = {row["row"]: row for row in rows}
    sampler_rows = rows[2:]
    worst = max(sampler_rows, key=lambda row: row["overhead"])
    targets = {
        "addpm_speedup": by_name[f"addpm {PRE_T}->{T}"]["speedup"],
        "ensemble_speedup": by_name[f"addpm K={ENSEMBLE} sequential"]["seconds"]
        / by_name[f"addpm K={ENSEMBLE} batched"]["seconds"],
        "worst_overhead": worst["overhead"],
        "worst_row": worst["row"],
        "params_m": bench.params_m,
        "size": bench.size,
    }
    return rows, targets


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description="Seconds per image of every sampler, as one table of ratios.")
    parser.add_argument("--config", default="small", choices=["small", "default", "both"],
                        help="model configuration: small (64x64, 32 channels), default (the original ADDPM model) or both")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions per row; the fastest counts (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the input and the samplers' noise")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; process: CPU time of this process, for a shared CPU "
                             "machine (use with --threads 1; not on GPU)")
    parser.add_argument("--ddpm_steps_measured", type=int, default=None,
                        help="time ddpm over N steps and extrapolate to 1000 (0 = all; default: all on "
                             "GPU, 200 on CPU at the small config, 3 at the default config)")
    parser.add_argument("--max_evals_measured", type=int, default=None,
                        help="time every other sampler over at most N loop evaluations and extrapolate "
                             "(0 = all; default: all, except 3 on CPU at the default config)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    for flag in ("ddpm_steps_measured", "max_evals_measured"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            parser.error(f"--{flag} must be 0 (all) or a positive number of evaluations, got {value}")

    device = dist_util.resolve_device(args.device)
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU time and cannot time a GPU; use --clock wall")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    names = ["small", "default"] if args.config == "both" else [args.config]
    all_rows, all_targets = [], {}
    with torch.inference_mode():
        for name in names:
            rows, targets = run_config(name, device, args)
            all_rows += rows
            all_targets[name] = targets

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; fp32; one image, {IMAGE_CHANNELS} channels; seed {args.seed}; "
          f"repeats {args.repeats}; {args.clock} clock")
    for name in names:
        t = all_targets[name]
        print(f"  {name}: {t['size']}x{t['size']}, UNet {t['params_m']:.2f}M parameters")
    header = (f"{'config':<8} {'row':<28} {'batch':>5} {'forwards':>8} {'measured':>9} {'s/image':>10} "
              f"{'vs ddpm':>8} {'s/forward':>10} {'vs bare':>8}")
    print(header)
    print("-" * len(header))
    for r in all_rows:
        mark = "*" if r["extrapolated"] else " "
        print(f"{r['config']:<8} {r['row']:<28} {r['batch']:>5} {r['forwards']:>8} {r['measured']:>9} "
              f"{r['seconds']:>9.3f}{mark} {r['speedup']:>7.1f}x {r['per_eval']:>10.4f} {r['overhead']:>+7.1%}")
    print("* extrapolated: the row timed only the loop evaluations in 'measured' (plus its fixed cost) "
          "and scaled the loop to all of them")
    print("s/forward: time per loop evaluation of the sampler (per member-batch); vs bare: relative to a "
          "bare UNet forward at the same batch size")
    print("targets:")
    for name in names:
        t = all_targets[name]
        print(f"  {name}: addpm vs ddpm-1000 {t['addpm_speedup']:.1f}x (>= {ADDPM_SPEEDUP_TARGET:.0f}x) "
              f"{verdict(t['addpm_speedup'] >= ADDPM_SPEEDUP_TARGET)}")
        applies = name == "small" and device.type == "cpu"
        note = verdict(t["ensemble_speedup"] >= ENSEMBLE_SPEEDUP_TARGET) if applies else "(target is for 64x64 on CPU)"
        print(f"  {name}: batched K={ENSEMBLE} ensemble vs sequential {t['ensemble_speedup']:.2f}x "
              f"(>= {ENSEMBLE_SPEEDUP_TARGET}x) {note}")
        print(f"  {name}: worst time per loop evaluation vs bare forward {t['worst_overhead']:+.1%} "
              f"({t['worst_row']}; within {LOOP_OVERHEAD_TARGET:.0%}) "
              f"{verdict(t['worst_overhead'] <= LOOP_OVERHEAD_TARGET)}")


if __name__ == "__main__":
    run_cli(main)
