"""Seconds per image of every sampler and of the bare UNet on the same weights, as tables of ratios.

    python -m benchmarks.bench_sampling [--config small medium default | both | all] [--device auto]
        [--precision fp32[,bf16,fp16]] [--repeats 3] [--seed 0] [--threads 2] [--clock wall|process]
        [--samplers all|none|NAME,...] [--compile False] [--memory_batches 0] [--peak_tflops X]
        [--ddpm_steps_measured N] [--max_evals_measured N] [--mask_channels 1[,3]]

Configurations (4 image channels, one mask channel unless ``--mask_channels`` asks for more, random weights with the UNet's zero-initialised
output conv re-initialised to small values, a random image and a random pre-segmentation):

- small:   64x64, 32 base channels, otherwise the original ADDPM model;
- medium:  128x128, 64 base channels, likewise;
- default: the original ADDPM README's model and diffusion (256x256, 128 channels, 2 res
  blocks, 1 head, attention at 16, no scale-shift norm, cosine schedule, 1000 steps).

Two tables per configuration and precision, all in one process:

1. UNet forward, side by side, at batch 1 and batch K: a reference guided-diffusion UNet
   (``benchmarks.reference_unet``, written from the published architecture and loaded with the
   same state dict), our UNet with the fast path off (the same computation) and on (what
   ``sample.py`` runs; compiled too with ``--compile True``). The variants are timed in turn,
   ``--repeats`` times before and again after the sampler rows (so a load that drifts during
   the run favours none of them); each figure is the median of those timings.
2. Samplers, every row through ``seg_sampling.sample_members`` (the function ``sample.py`` uses)
   on the fast-path UNet: ddpm (1000 steps, Wolleb), ddim (100 steps), addpm (pre_t 300 -> T 250,
   then a small denoising net from ``preseg.build_network``), addpm with 10 spaced steps, and an
   addpm ensemble of K = 5 members run as one batch against five sequential runs. A row's
   loop time (its time less the denoising net, timed on its own) per loop evaluation is compared
   with the bare fast-path forward at the same batch size. Where fewer loop evaluations are
   timed than the plan has (``--ddpm_steps_measured``, ``--max_evals_measured``; by default on
   CPU: ddpm 200 steps at small, 50 at medium, every row 3 evaluations at default) the total is
   extrapolated and the row marked ``*``.

Every row shows TFLOP/s (the FLOPs of one forward counted by ``torch.utils.flop_counter``) and, on
CUDA, the share of the GPU's dense bf16 peak and the peak memory of a process holding only the
row's networks (the row's own peak by ``torch.cuda.max_memory_allocated`` plus those weights). ``--memory_batches N`` then runs the addpm K = 5 ensemble on N fresh images (the first
precision) and compares the memory in use after image 10 with that after image N: a sampler that
keeps references grows. On a CPU shared with other jobs, ``--threads 1 --clock process`` times
the process's own CPU time, which other jobs barely disturb.

``--mask_channels 1,3`` runs every configuration once per number K of mask channels (one per
class or region: the UNet's input and output, the pre-segmentation and the denoising net follow
K) and closes with a table of each sampler's s/image at K = 3 against K = 1, side by side.
"""

import argparse
import copy
import dataclasses
import math
import os
import statistics
import time

import torch

from benchmarks.reference_unet import reference_like
from denoiser import denoiser_input
from guided_diffusion import dist_util
from guided_diffusion.fast_path import apply_fast_path
from guided_diffusion.gaussian_diffusion import build_model_input
from guided_diffusion.script_util import create_model_and_diffusion, diffusion_defaults, run_cli, str2bool, unet_defaults
from guided_diffusion.seg_sampling import plan_sampler, sample_members
from preseg import build_network, mask_probabilities

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
    "medium": dict(image_size=128, flags={**ORIGINAL_FLAGS, "num_channels": 64}),
    "default": dict(image_size=256, flags=dict(ORIGINAL_FLAGS)),
}
CONFIG_GROUPS = {"both": ("small", "default"), "all": tuple(CONFIGS)}
SAMPLERS = ("ddpm", "ddim", "addpm", "addpm10", f"addpm-k{ENSEMBLE}", f"addpm-k{ENSEMBLE}-seq")
# Loop evaluations timed on CPU (0 = all); GPUs time everything.
CPU_MEASURED = {"small": {"ddpm": 200, "other": 0}, "medium": {"ddpm": 50, "other": 0},
                "default": {"ddpm": 3, "other": 3}}
FORWARD_EVALS = {"cpu": {"small": 5, "medium": 2, "default": 1}, "other": 20}

# Targets. CPU (one thread, fp32): the fast path ahead of guided-diffusion's UNet at 64x64 and
# 128x128; truncation pays off; batching members pays off; the loop adds little to the UNet.
REFERENCE_SPEEDUP_TARGET = 1.3
ADDPM_SPEEDUP_TARGET = 18.0
ENSEMBLE_SPEEDUP_TARGET = 1.5
LOOP_OVERHEAD_TARGET = 0.15
# GPU: a K=5 ensemble of one 256x256 slice at the original config within a second; bf16 twice fp32.
ENSEMBLE_SECONDS_TARGET = 1.0
BF16_SPEEDUP_TARGET = 2.0
# Memory in use may drift by allocator rounding, not by a tensor per image.
MEMORY_GROWTH_LIMIT_MIB = 8.0

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the
# first name contained in the device's name counts. --peak_tflops overrides.
DENSE_BF16_PEAK_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)
# "wall": elapsed time. "process": CPU time of this process, which on a shared machine is the
# better estimate of the elapsed time on an idle one (exact with --threads 1; with more
# threads it also counts the time they spend waiting for each other).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
REFERENCE, EXACT, FAST, COMPILED = "reference (guided-diffusion)", "ours, fast path off", "ours, fast path", "ours, compiled"


class Timer:
    """Times calls on one device: seconds by the chosen clock and, on CUDA, peak memory."""

    def __init__(self, device: torch.device, clock: str):
        self.device, self.clock = device, CLOCKS[clock]
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> tuple:
        """(seconds, peak bytes the call allocated above what was held before it, or None off CUDA)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            held = torch.cuda.memory_allocated(self.device)
        start = self.clock()
        fn()
        self.sync()
        seconds = self.clock() - start
        return seconds, torch.cuda.max_memory_allocated(self.device) - held if self.cuda else None

    def median(self, fn, repeats: int) -> tuple:
        """(median seconds, highest peak bytes or None) of ``repeats`` calls of ``fn``."""
        runs = [self(fn) for _ in range(repeats)]
        return statistics.median(s for s, _ in runs), max_peak(p for _, p in runs)

    def memory_in_use(self) -> int:
        """Bytes held now: allocated tensors on CUDA, the resident set on CPU (Linux)."""
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_peak(peaks) -> int | None:
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def weight_bytes(module) -> int:
    module = getattr(module, "model", module)  # a CompiledUNet holds its UNet
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def with_weights(peak, *modules) -> int | None:
    """A row's peak as a process holding only the row's networks sees it: the call's own peak
    above what was held before (every variant's weights) plus those networks' weights."""
    return None if peak is None else peak + sum(weight_bytes(m) for m in modules)


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Bench:
    """The model variants, diffusion, denoiser and input of one configuration."""

    def __init__(self, name: str, device: torch.device, args, mask_channels: int = 1):
        spec = CONFIGS[name]
        self.name, self.device, self.seed = name, device, args.seed
        self.mask_channels = mask_channels
        # Tables name a K-channel bench "small-K3"; one channel keeps the configuration's name.
        self.label = name if mask_channels == 1 else f"{name}-K{mask_channels}"
        self.size = spec["image_size"]
        flags = {**unet_defaults(), **diffusion_defaults(), **spec["flags"]}
        torch.manual_seed(args.seed)
        model, self.diffusion = create_model_and_diffusion(
            image_size=self.size, image_channels=IMAGE_CHANNELS, mask_channels=mask_channels, **flags
        )
        # The output conv starts at zero (improved-diffusion); small weights keep eps non-zero.
        torch.nn.init.normal_(model.out[-1].weight, std=0.02)
        model = model.to(device).eval()
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        # The same weights in every variant; the fast path changes only how they are computed.
        self.variants = {
            REFERENCE: reference_like(model).eval(),
            EXACT: apply_fast_path(copy.deepcopy(model), device, enabled=False),
            FAST: apply_fast_path(copy.deepcopy(model), device),
        }
        if args.compile:
            self.variants[COMPILED] = apply_fast_path(model, device, compile=True)
        self.sampling_variant = COMPILED if args.compile else FAST
        self.model = self.variants[self.sampling_variant]
        net = build_network("unet", in_channels=mask_channels, num_classes=mask_channels + 1, base_channels=16,
                            depth=3)
        self.denoiser = net.to(device).eval()
        g = torch.Generator().manual_seed(args.seed)
        self.image = torch.randn(1, IMAGE_CHANNELS, self.size, self.size, generator=g).to(device)
        self.preseg = (torch.rand(1, mask_channels, self.size, self.size, generator=g) > 0.7).float().to(device)
        x = torch.randn(1, mask_channels, self.size, self.size, device=device)
        self.unet_flops = count_flops(lambda: self.variants[EXACT](*self.forward_input(1)))
        self.denoise_flops = count_flops(lambda: self.denoise(x, None))

    def denoise(self, x_T: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return mask_probabilities(self.denoiser(denoiser_input(x_T, None, "none")))

    def forward_input(self, batch: int) -> tuple:
        image = self.image.expand(batch, -1, -1, -1)
        x = torch.randn(batch, self.mask_channels, self.size, self.size, device=self.device)
        t = torch.full((batch,), PRE_T, device=self.device, dtype=torch.long)
        return build_model_input(image, x), self.diffusion.scale_timesteps(t)

    def run_plan(self, plan, *, members: int, calls: int, evaluations: int, image=None) -> torch.Tensor:
        """``calls`` runs of the first ``evaluations`` loop steps of ``plan``, ``members`` each."""
        sub = dataclasses.replace(plan, timesteps=plan.timesteps[: evaluations + 1])
        for call in range(calls):
            generator = torch.Generator(device=self.device).manual_seed(self.seed + call)
            out = sample_members(
                sub, diffusion=self.diffusion, model=self.model, images=self.image if image is None else image,
                num_ensemble=members, mask_space="pm1", preseg_probs=self.preseg,
                denoise_fn=self.denoise, generator=generator, mask_channels=self.mask_channels,
            )
        return out


def forward_rows(bench: Bench, timer: Timer, repeats: int, evaluations: int) -> dict:
    """Seconds per forward of every variant at batch 1 and K, timed in turn ``repeats`` times.

    :return: {(variant, batch): {"samples": [seconds per forward, ...], "peak": bytes or None}}
    """
    results = {}
    calls = {}
    for batch in (1, ENSEMBLE):
        inputs = bench.forward_input(batch)
        for name, model in bench.variants.items():
            def run(model=model, inputs=inputs):
                for _ in range(evaluations):
                    model(*inputs)

            run()  # warm-up (and, compiled, the compilation) outside the timings
            calls[(name, batch)] = run
            results[(name, batch)] = {"samples": [], "peak": None}
    for _ in range(repeats):
        for key, run in calls.items():
            seconds, peak = timer(run)
            results[key]["samples"].append(seconds / evaluations)
            results[key]["peak"] = max_peak([results[key]["peak"], peak])
    return results


def merge_forward(before: dict, after: dict) -> dict:
    return {key: {"samples": before[key]["samples"] + after[key]["samples"],
                  "peak": max_peak([before[key]["peak"], after[key]["peak"]])} for key in before}


def sampler_specs(bench: Bench, measured: dict) -> list:
    """(key, label, plan, members, calls, loop evaluations to time) of every sampler row."""
    n_steps = bench.diffusion.num_timesteps
    addpm = plan_sampler("addpm", num_timesteps=n_steps, pre_t=PRE_T, T=T)
    other = measured["other"]
    return [
        ("ddpm", "ddpm-1000", plan_sampler("ddpm", num_timesteps=n_steps), 1, 1, measured["ddpm"]),
        ("ddim", "ddim-100", plan_sampler("ddim", num_timesteps=n_steps, sampling_steps=100), 1, 1, other),
        ("addpm", f"addpm {PRE_T}->{T}", addpm, 1, 1, other),
        ("addpm10", f"addpm {PRE_T}->{T} 10 steps",
         plan_sampler("addpm", num_timesteps=n_steps, pre_t=PRE_T, T=T, sampling_steps=10), 1, 1, other),
        (f"addpm-k{ENSEMBLE}", f"addpm K={ENSEMBLE} batched", addpm, ENSEMBLE, 1, other),
        (f"addpm-k{ENSEMBLE}-seq", f"addpm K={ENSEMBLE} sequential", addpm, 1, ENSEMBLE, other),
    ]


def sampler_row(bench: Bench, timer: Timer, spec: tuple, repeats: int) -> dict:
    """Time one sampler row: the loop's cost is the run less the denoising net, per evaluation."""
    key, label, plan, members, calls, measured = spec
    total = len(plan.timesteps) - 1
    n = total if measured <= 0 else min(measured, total)
    bench.run_plan(plan, members=members, calls=calls, evaluations=1)
    fixed = 0.0
    if plan.final_step == "denoiser":
        x_T = torch.randn(members, bench.mask_channels, bench.size, bench.size, device=bench.device)
        bench.denoise(x_T, None)
        fixed = timer.median(lambda: bench.denoise(x_T, None), max(repeats, 5))[0] * calls
    seconds, peak = timer.median(lambda: bench.run_plan(plan, members=members, calls=calls, evaluations=n), repeats)
    per_eval = max(seconds - fixed, 0.0) / n
    flops = (bench.unet_flops * plan.unet_evaluations * members
             + (bench.denoise_flops * members if plan.final_step == "denoiser" else 0)) * calls
    return dict(key=key, row=label, batch=members, forwards=plan.unet_evaluations * calls,
                seconds=seconds + (total - n) * per_eval, per_eval=per_eval / calls,
                peak=with_weights(peak, bench.model, bench.denoiser),
                flops=flops, measured=f"{n}/{plan.unet_evaluations}", extrapolated=n < total)


def memory_run(bench: Bench, timer: Timer, images: int) -> dict:
    """The addpm K=5 ensemble on ``images`` fresh images, as sample.py runs them one after another."""
    plan = plan_sampler("addpm", num_timesteps=bench.diffusion.num_timesteps, pre_t=PRE_T, T=T)
    levels = {}
    g = torch.Generator().manual_seed(bench.seed + 1)
    for i in range(1, images + 1):
        image = torch.randn(1, IMAGE_CHANNELS, bench.size, bench.size, generator=g).to(bench.device)
        bench.run_plan(plan, members=ENSEMBLE, calls=1, evaluations=len(plan.timesteps) - 1,
                       image=image).float().cpu()
        timer.sync()
        if i in (min(10, images), images):
            levels[i] = timer.memory_in_use()
    first, last = sorted(levels)[0], sorted(levels)[-1]
    return {"first": first, "last": last, "first_mib": levels[first] / 2**20, "last_mib": levels[last] / 2**20}


def run_precision(bench: Bench, timer: Timer, precision: str, args) -> dict:
    """Both tables of one configuration at one precision."""
    device = bench.device
    auto = CPU_MEASURED[bench.name] if device.type == "cpu" else {"ddpm": 0, "other": 0}
    measured = {
        "ddpm": auto["ddpm"] if args.ddpm_steps_measured is None else args.ddpm_steps_measured,
        "other": auto["other"] if args.max_evals_measured is None else args.max_evals_measured,
    }
    evals = FORWARD_EVALS["cpu"][bench.name] if device.type == "cpu" else FORWARD_EVALS["other"]
    specs = [spec for spec in sampler_specs(bench, measured) if spec[0] in args.samplers]
    with dist_util.autocast_context(device, precision):
        before = forward_rows(bench, timer, args.repeats, evals)
        samplers = [sampler_row(bench, timer, spec, args.repeats) for spec in specs]
        after = forward_rows(bench, timer, args.repeats, evals)
        memory = memory_run(bench, timer, args.memory_batches) if args.memory_batches else None
    forward = merge_forward(before, after)
    seconds = {key: statistics.median(value["samples"]) for key, value in forward.items()}
    floor = {batch: seconds[(bench.sampling_variant, batch)] for batch in (1, ENSEMBLE)}
    for row in samplers:
        row["overhead"] = row["per_eval"] / floor[row["batch"]] - 1.0
    return dict(forward=forward, seconds=seconds, samplers=samplers, memory=memory)


def gpu_peak(device: torch.device, override: float) -> tuple:
    """(dense bf16 peak TFLOP/s or None, where the figure comes from)."""
    if override > 0:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, "not a GPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DENSE_BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"{key} data sheet"
    return None, f"unknown for {name}; pass --peak_tflops"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _mib(peak) -> str:
    return "-" if peak is None else f"{peak / 2**20:.0f}"


def _rate(flops: float, seconds: float, peak_tflops) -> tuple:
    tflops = flops / seconds / 1e12 if seconds > 0 else math.inf
    share = "-" if peak_tflops is None else f"{tflops / peak_tflops:.1%}"
    return f"{tflops:.3g}", share


def print_forward_table(results: dict, benches: dict, peak_tflops) -> None:
    header = (f"{'config':<8} {'prec':<5} {'variant':<28} {'batch':>5} {'s/forward':>10} {'vs reference':>12} "
              f"{'TFLOP/s':>8} {'of peak':>8} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for (name, precision), result in results.items():
        bench = benches[name]
        for (variant, batch), seconds in result["seconds"].items():
            reference = result["seconds"][(REFERENCE, batch)]
            tflops, share = _rate(bench.unet_flops * batch, seconds, peak_tflops)
            peak = with_weights(result["forward"][(variant, batch)]["peak"], bench.variants[variant])
            print(f"{name:<8} {precision:<5} {variant:<28} {batch:>5} {seconds:>10.4f} {reference / seconds:>11.2f}x "
                  f"{tflops:>8} {share:>8} {_mib(peak):>9}")


def print_sampler_table(results: dict, peak_tflops) -> None:
    header = (f"{'config':<8} {'prec':<5} {'row':<28} {'batch':>5} {'forwards':>8} {'measured':>9} {'s/image':>10} "
              f"{'vs ddpm':>8} {'s/forward':>10} {'vs bare':>8} {'TFLOP/s':>8} {'of peak':>8} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for (name, precision), result in results.items():
        ddpm = next((r["seconds"] for r in result["samplers"] if r["key"] == "ddpm"), None)
        for r in result["samplers"]:
            mark = "*" if r["extrapolated"] else " "
            speedup = "-" if ddpm is None else f"{ddpm / r['seconds']:.1f}x"
            tflops, share = _rate(r["flops"], r["seconds"], peak_tflops)
            print(f"{name:<8} {precision:<5} {r['row']:<28} {r['batch']:>5} {r['forwards']:>8} {r['measured']:>9} "
                  f"{r['seconds']:>9.3f}{mark} {speedup:>8} {r['per_eval']:>10.4f} {r['overhead']:>+7.1%} "
                  f"{tflops:>8} {share:>8} {_mib(r['peak']):>9}")
    print("* extrapolated: the row timed only the loop evaluations in 'measured' (plus its fixed cost) "
          "and scaled the loop to all of them")
    print("s/forward: time per loop evaluation of the sampler (per member-batch); vs bare: relative to a "
          "bare fast-path UNet forward at the same batch size")


def forward_targets(name: str, precision: str, result: dict, device: torch.device) -> list:
    lines = []
    applies = device.type == "cpu" and torch.get_num_threads() == 1 and precision == "fp32" and name != "default"
    for batch in (1, ENSEMBLE):
        seconds = result["seconds"]
        ratio = seconds[(REFERENCE, batch)] / seconds[(FAST, batch)]
        note = verdict(ratio >= REFERENCE_SPEEDUP_TARGET) if applies else "(target: CPU, one thread, fp32, 64 and 128)"
        lines.append(f"{name} {precision}: UNet forward, fast path vs reference at batch {batch}: {ratio:.2f}x "
                     f"(>= {REFERENCE_SPEEDUP_TARGET}x) {note}")
    return lines


def sampler_targets(name: str, precision: str, result: dict, device: torch.device) -> list:
    rows = {r["key"]: r for r in result["samplers"]}
    lines = []
    batched, sequential = rows.get(f"addpm-k{ENSEMBLE}"), rows.get(f"addpm-k{ENSEMBLE}-seq")
    if "ddpm" in rows and "addpm" in rows:
        speedup = rows["ddpm"]["seconds"] / rows["addpm"]["seconds"]
        lines.append(f"{name} {precision}: addpm vs ddpm-1000 {speedup:.1f}x (>= {ADDPM_SPEEDUP_TARGET:.0f}x) "
                     f"{verdict(speedup >= ADDPM_SPEEDUP_TARGET)}")
    if batched and sequential:
        speedup = sequential["seconds"] / batched["seconds"]
        note = verdict(speedup >= ENSEMBLE_SPEEDUP_TARGET) if name == "small" and device.type == "cpu" \
            else "(target is for 64x64 on CPU)"
        lines.append(f"{name} {precision}: batched K={ENSEMBLE} ensemble vs sequential {speedup:.2f}x "
                     f"(>= {ENSEMBLE_SPEEDUP_TARGET}x) {note}")
    if batched and name == "default":
        note = verdict(batched["seconds"] <= ENSEMBLE_SECONDS_TARGET) if device.type == "cuda" else "(target is for a GPU)"
        lines.append(f"{name} {precision}: addpm K={ENSEMBLE} ensemble of one {CONFIGS[name]['image_size']}px slice "
                     f"{batched['seconds']:.3f} s (<= {ENSEMBLE_SECONDS_TARGET:.0f} s) {note}")
    if rows:
        worst = max(rows.values(), key=lambda row: row["overhead"])
        lines.append(f"{name} {precision}: worst time per loop evaluation vs bare forward {worst['overhead']:+.1%} "
                     f"({worst['row']}; within {LOOP_OVERHEAD_TARGET:.0%}) "
                     f"{verdict(worst['overhead'] <= LOOP_OVERHEAD_TARGET)}")
    return lines


def precision_targets(name: str, results: dict, device: torch.device) -> list:
    """bf16 against fp32 of the same configuration, where both ran."""
    if (name, "fp32") not in results or (name, "bf16") not in results:
        return []
    fp32, bf16 = results[(name, "fp32")], results[(name, "bf16")]
    pairs = [(f"UNet forward (fast path, batch {ENSEMBLE})", fp32["seconds"][(FAST, ENSEMBLE)],
              bf16["seconds"][(FAST, ENSEMBLE)])]
    rows32, rows16 = ({r["key"]: r for r in res["samplers"]} for res in (fp32, bf16))
    for key in (f"addpm-k{ENSEMBLE}", "ddpm"):
        if key in rows32 and key in rows16:
            pairs.append((rows32[key]["row"], rows32[key]["seconds"], rows16[key]["seconds"]))
    note_for = (lambda ratio: verdict(ratio >= BF16_SPEEDUP_TARGET)) if device.type == "cuda" \
        else (lambda ratio: "(target is for a GPU)")
    return [f"{name}: bf16 vs fp32, {label}: {slow / fast:.2f}x (>= {BF16_SPEEDUP_TARGET:.0f}x) {note_for(slow / fast)}"
            for label, slow, fast in pairs]


def memory_lines(results: dict, device: torch.device) -> list:
    what = "allocated GPU memory" if device.type == "cuda" else "resident set"
    lines = []
    for (name, precision), result in results.items():
        memory = result["memory"]
        if memory is None:
            continue
        growth = memory["last_mib"] - memory["first_mib"]
        lines.append(f"{name} {precision}: {what} after image {memory['first']} {memory['first_mib']:.1f} MiB, "
                     f"after image {memory['last']} {memory['last_mib']:.1f} MiB ({growth:+.1f} MiB; "
                     f"within {MEMORY_GROWTH_LIMIT_MIB:.0f} MiB) {verdict(growth <= MEMORY_GROWTH_LIMIT_MIB)}")
    return lines


def print_channels_table(results: dict, benches: dict) -> None:
    """Each sampler's s/image with K mask channels against one, where both ran."""
    pairs = [(label, precision, bench) for (label, precision) in results
             for bench in [benches[label]] if bench.mask_channels > 1 and (bench.name, precision) in results]
    if not pairs:
        return
    header = f"{'config':<8} {'prec':<5} {'row':<28} {'K':>3} {'s/image K=1':>12} {'s/image':>10} {'vs K=1':>8}"
    print("\nCost of K mask channels (one per class or region), each row against the same row with one channel")
    print(header)
    print("-" * len(header))
    for label, precision, bench in pairs:
        single = {r["key"]: r for r in results[(bench.name, precision)]["samplers"]}
        for r in results[(label, precision)]["samplers"]:
            if r["key"] in single:
                one = single[r["key"]]["seconds"]
                print(f"{bench.name:<8} {precision:<5} {r['row']:<28} {bench.mask_channels:>3} {one:>12.3f} "
                      f"{r['seconds']:>10.3f} {r['seconds'] / one:>7.2f}x")


def report(results: dict, benches: dict, device: torch.device, args) -> None:
    peak_tflops, source = gpu_peak(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; precision {', '.join(args.precision)}; one image, "
          f"{IMAGE_CHANNELS} channels; seed {args.seed}; repeats {args.repeats}; {args.clock} clock")
    for name, bench in benches.items():
        print(f"  {name}: {bench.size}x{bench.size}, {bench.mask_channels} mask channel(s), UNet {bench.params_m:.2f}M parameters, "
              f"{bench.unet_flops / 1e9:.1f} GFLOP per forward of one image")
    print(f"dense bf16 peak: {'-' if peak_tflops is None else f'{peak_tflops:.0f} TFLOP/s'} ({source})")
    print(f"\nUNet forward on the same weights, side by side (median of {2 * args.repeats} timings per row, "
          "taken in turn before and after the samplers)")
    print_forward_table(results, benches, peak_tflops)
    if any(result["samplers"] for result in results.values()):
        print(f"\nSamplers, on the UNet as in '{next(iter(benches.values())).sampling_variant}'")
        print_sampler_table(results, peak_tflops)
        print_channels_table(results, benches)
    lines = []
    for (name, precision), result in results.items():
        lines += forward_targets(name, precision, result, device) + sampler_targets(name, precision, result, device)
    for name in benches:
        lines += precision_targets(name, results, device)
    lines += memory_lines(results, device)
    print("\ntargets:")
    for line in lines:
        print(f"  {line}")


def parse_list(text: str, choices, flag: str, parser) -> list:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        parser.error(f"--{flag}: unknown {', '.join(unknown) or 'empty list'} (choose from {', '.join(choices)})")
    return values


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Seconds per image of every sampler and of the bare UNet, "
                                                 "against a reference guided-diffusion UNet on the same weights.")
    parser.add_argument("--config", nargs="+", default=["small"], choices=[*CONFIGS, *CONFIG_GROUPS],
                        help="configurations: small (64x64, 32 channels), medium (128x128, 64), default (the "
                             "original ADDPM model); both = small default, all = all three")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated autocast precisions, each a full set of rows: fp32, bf16, fp16 (CUDA)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per row (forward rows: before and after the samplers each); the median counts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the input and the samplers' noise")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; process: CPU time of this process, for a shared CPU "
                             "machine (use with --threads 1; not on GPU)")
    parser.add_argument("--samplers", default="all",
                        help=f"sampler rows: all, none, or a comma-separated subset of {', '.join(SAMPLERS)}")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="also time the torch.compile'd UNet, and run the samplers on it")
    parser.add_argument("--memory_batches", type=int, default=0,
                        help="then run the addpm K=5 ensemble on N fresh images and compare the memory in use "
                             "after image 10 and image N (0 = off)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the GPU's dense bf16 peak in TFLOP/s, for GPUs the built-in table does not name")
    parser.add_argument("--ddpm_steps_measured", type=int, default=None,
                        help="time ddpm over N steps and extrapolate to 1000 (0 = all; default: all on GPU; "
                             "on CPU 200 at small, 50 at medium, 3 at default)")
    parser.add_argument("--mask_channels", default="1",
                        help="comma-separated numbers K of mask channels (classes or regions), e.g. 1,3: every "
                             "configuration runs once per K, and a last table compares each K with K=1")
    parser.add_argument("--max_evals_measured", type=int, default=None,
                        help="time every other sampler over at most N loop evaluations and extrapolate "
                             "(0 = all; default: all, except 3 on CPU at the default config)")
    return parser


def parse_args():
    parser = create_argparser()
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.memory_batches < 0:
        parser.error(f"--memory_batches must be 0 (off) or a number of images, got {args.memory_batches}")
    for flag in ("ddpm_steps_measured", "max_evals_measured"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            parser.error(f"--{flag} must be 0 (all) or a positive number of evaluations, got {value}")
    args.precision = parse_list(args.precision, dist_util.PRECISIONS, "precision", parser)
    special = {"all": list(SAMPLERS), "none": []}
    args.samplers = special.get(args.samplers.strip()) if args.samplers.strip() in special \
        else parse_list(args.samplers, SAMPLERS, "samplers", parser)
    args.config = list(dict.fromkeys(n for c in args.config for n in CONFIG_GROUPS.get(c, (c,))))
    try:
        args.mask_channels = list(dict.fromkeys(int(k) for k in args.mask_channels.split(",") if k.strip()))
    except ValueError:
        parser.error(f"--mask_channels must be comma-separated positive integers like 1,3, got {args.mask_channels!r}")
    if not args.mask_channels or min(args.mask_channels) < 1:
        parser.error(f"--mask_channels must be comma-separated positive integers like 1,3, got {args.mask_channels}")
    return parser, args


def main() -> None:
    parser, args = parse_args()
    device = dist_util.resolve_device(args.device)
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU time and cannot time a GPU; use --clock wall")
    for precision in args.precision:
        dist_util.autocast_context(device, precision)  # an unsupported precision stops here, in one line
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    timer = Timer(device, args.clock)
    benches, results = {}, {}
    with torch.inference_mode():
        for name in args.config:
            for mask_channels in args.mask_channels:
                bench = Bench(name, device, args, mask_channels)
                benches[bench.label] = bench
                for precision in args.precision:
                    results[(bench.label, precision)] = run_precision(bench, timer, precision, args)
    report(results, benches, device, args)


if __name__ == "__main__":
    run_cli(main)
