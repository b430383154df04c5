"""Training speed and peak memory of the conditional diffusion UNet, printed as a table.

    python -m benchmarks.bench_train [--device auto] [--steps 10] [--precision fp32[,bf16,fp16]] [--threads 0]

Two configurations, on random in-memory data (no dataset, no disk):

- small:    64x64 images, 32 base channels, batch 4;
- original: the ADDPM README's model (256x256, 128 channels, 2 res blocks, 1 head, attention at
  16, no scale-shift norm, cosine schedule, 1000 steps), batch 4; on CPU only
  ``--original_steps`` (default 2) steps are timed.

Each configuration and precision runs in a fresh process: full ``TrainLoop.run_step`` calls
(forward, backward, AdamW, EMA) after one untimed warm-up step. With fp32 and bf16 both given,
the speed-up of bf16 is printed per configuration. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the growth of the process's peak
resident set (``resource.getrusage``) from before the model was built.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import Dataset

from guided_diffusion import dist_util, logger
from guided_diffusion.script_util import create_model_and_diffusion, diffusion_defaults, run_cli, unet_defaults
from guided_diffusion.train_util import TrainLoop

IMAGE_CHANNELS = 4
CONFIGS = {
    "small": dict(
        image_size=64, batch_size=4, flags=dict(num_channels=32, num_res_blocks=1, attention_resolutions="16")
    ),
    "original": dict(
        image_size=256,
        batch_size=4,
        flags=dict(
            num_channels=128, num_res_blocks=2, num_heads=1, learn_sigma=False,
            use_scale_shift_norm=False, attention_resolutions="16", diffusion_steps=1000,
            noise_schedule="cosine", rescale_learned_sigmas=False, rescale_timesteps=False,
        ),
    ),
}


class RandomSegmentation(Dataset):
    """``n`` random images [C,S,S] with random binary labels [S,S], held in memory."""

    def __init__(self, n: int, image_size: int, channels: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, channels, image_size, image_size, generator=g)
        self.labels = (torch.rand(n, image_size, image_size, generator=g) > 0.7).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


def _max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def run_one(name: str, device_flag: str, steps: int, precision: str) -> dict:
    """Time ``steps`` training steps of configuration ``name`` in this process."""
    spec = CONFIGS[name]
    device = dist_util.resolve_device(device_flag)
    ctx = dist_util.DistContext(rank=0, world_size=1, local_rank=0, device=device)
    rss_before = _max_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flags = {**unet_defaults(), **diffusion_defaults(), **spec["flags"]}
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        image_size=spec["image_size"], image_channels=IMAGE_CHANNELS, **flags
    )
    data = RandomSegmentation(spec["batch_size"], spec["image_size"], IMAGE_CHANNELS)
    batch = {"image": data.images, "label": data.labels}
    with tempfile.TemporaryDirectory() as out_dir:
        logger.configure(dir=out_dir, formats=())
        loop = TrainLoop(
            model=model, diffusion=diffusion, dataset=data, collate_fn=None, config={},
            out_dir=out_dir, ctx=ctx, batch_size=spec["batch_size"], lr=1e-4,
            ema_rate="0.9999", precision=precision, log_interval=10**9, save_interval=10**9,
            progress=False,
        )
        loop.run_step(batch)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loop.run_step(batch)
        sync()
        elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _max_rss_bytes() - rss_before
    return {
        "config": name,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": precision,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "image_size": spec["image_size"],
        "batch": spec["batch_size"],
        "steps": steps,
        "steps_per_s": steps / elapsed,
        "samples_per_s": steps * spec["batch_size"] / elapsed,
        "peak_mib": peak / 2**20,
    }


def run_fresh(name: str, precision: str, device: torch.device, args) -> dict:
    """``run_one`` in a fresh process, so that the peak memory of one row does not hide another's."""
    steps = args.steps
    if name == "original":
        steps = args.original_steps or (args.steps if device.type == "cuda" else 2)
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--only", name, "--device", args.device,
           "--steps", str(steps), "--precision", precision, "--threads", str(args.threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"configuration {name} ({precision}) failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Training steps/s and peak memory of the diffusion UNet.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default: 10)")
    parser.add_argument("--original_steps", type=int, default=0,
                        help="timed steps of the original config; 0 = --steps on CUDA, 2 on CPU")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated precisions, each a row per configuration: fp32, bf16, fp16 (CUDA)")
    parser.add_argument("--configs", default="small,original", help="comma-separated subset of small,original")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (torch.set_num_threads); 0 = torch's default")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = create_argparser()
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run_one(args.only, args.device, args.steps, args.precision)))
        return

    device = dist_util.resolve_device(args.device)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for name in names:
        if name not in CONFIGS:
            parser.error(f"--configs: unknown configuration {name!r} (choose from {', '.join(CONFIGS)})")
    for precision in precisions:
        if precision not in dist_util.PRECISIONS:
            parser.error(f"--precision: unknown {precision!r} (choose from {', '.join(dist_util.PRECISIONS)})")
        dist_util.autocast_context(device, precision)  # fp16 off CUDA stops here, in one line
    rows = [run_fresh(name, precision, device, args) for name in names for precision in precisions]
    header = (
        f"{'config':<9} {'device':<22} {'prec':<5} {'params':>8} {'size':>5} {'batch':>5} {'steps':>5} "
        f"{'steps/s':>9} {'samples/s':>10} {'peak MiB':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<9} {r['device'][:22]:<22} {r['precision']:<5} {r['params_m']:>7.2f}M "
            f"{r['image_size']:>5} {r['batch']:>5} {r['steps']:>5} {r['steps_per_s']:>9.3f} "
            f"{r['samples_per_s']:>10.2f} {r['peak_mib']:>10.0f}"
        )
    by_key = {(r["config"], r["precision"]): r for r in rows}
    for name in names:
        if (name, "fp32") in by_key and (name, "bf16") in by_key:
            ratio = by_key[(name, "bf16")]["steps_per_s"] / by_key[(name, "fp32")]["steps_per_s"]
            print(f"{name}: bf16 vs fp32 {ratio:.2f}x steps/s")
    if device.type != "cuda":
        print("peak MiB on CPU: growth of the process's peak resident set while building and training")


if __name__ == "__main__":
    run_cli(main)
