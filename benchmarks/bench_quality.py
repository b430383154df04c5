"""Segmentation quality of addpm against ddpm, ddim and the pre-segmentation alone, on any data.

    python -m benchmarks.bench_quality --data_dir DIR --out OUT [--dataset auto]
        [--steps_preseg 2000] [--steps_denoiser 2000] [--steps_diffusion 20000]
        [--image_size 128] [--num_channels 64] [--base_channels 32] [--num_ensemble 5]
        [--test_fraction 0.2] [--split_seed 0] [--max_test_cases 0] [--ddpm_steps 0]
        [--device auto]

The check of ADDPM's central claim on a user's own data: at about a tenth of the UNet
evaluations, addpm is at least as accurate as vanilla ddpm and improves on the
pre-segmentation it starts from. Phases, each a run of the real scripts (``sys.executable``):

1. split: the layout's records (``data.layouts.scan``; a record is a slice, an image or a
   volume, with its patient) are split BY PATIENT with ``--split_seed`` into
   ``OUT/split/train`` and ``OUT/split/test`` (``--test_fraction`` of the patients). Each
   record's files are mirrored there as symbolic links at their relative paths, with the
   layout's own files (dataset.json and the like) beside them, so every layout reads as
   before. Records without a label are left out. ``--max_test_cases N`` keeps N test records
   drawn at random (seeded) from all test patients.
2. train: the pre-segmentation net, the denoising net and the diffusion UNet on the training
   split, each with its own patient-wise validation split inside it (``--val_fraction``).
3. sample: the test split with ``--sampler preseg``, ``ddpm`` (``--ddpm_steps``; 0 = the full
   chain), ``ddim`` (``--ddim_steps``) and ``addpm`` (``--pre_t`` -> ``--T``), all with the
   same ``--num_ensemble`` and seed.
4. report: ``evaluation.compare`` gives Dice and HD95 per case and per patient (or volume),
   each with a 95% confidence interval of the mean (t-distribution), with UNet evaluations and
   seconds per image. ``OUT/table.md`` holds the budget and the table, ``OUT/table.json`` every
   number; both are printed.

Logs of every phase go to ``OUT/logs``. A rerun with the same settings reuses the finished
phases (a trained net's final.pt, a sampler's summary.json), continues an interrupted trainer
from its newest checkpoint (``--resume auto``) and an interrupted sampler from its last written
case; ``--fresh`` starts over. OUT/settings.json records the settings; a rerun with others is
refused.
"""

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from data.io import is_image, is_nifti
from data.layouts import DATASET_CHOICES, scan
from evaluation.compare import compare_runs, format_table
from evaluation.report import write_summary_json
from guided_diffusion.errors import AddpmError, ConfigError
from guided_diffusion.script_util import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("preseg", "ddpm", "ddim", "addpm")
LOG_TAIL_LINES = 15


class BenchError(AddpmError):
    """A phase of the benchmark that cannot run or failed."""


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_quality",
        description="Train the three ADDPM networks on a patient-wise training split of any "
        "dataset and compare addpm, ddpm, ddim and the pre-segmentation on its test split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data_dir", required=True, help="the dataset folder (any layout data.layouts reads)")
    add("--dataset", default="auto", help=f"layout: {', '.join(DATASET_CHOICES)}")
    add("--mask_suffix", default="_mask", help="suffix of masks beside their images (lgg, folder)")
    add("--foreground_labels", default="",
        help="label values counted as foreground, e.g. 1,4; empty = every non-zero label")
    add("--resize_mode", default="resize",
        help="resize (any input size maps to --image_size) or crop_pad (centre crop/pad)")
    add("--out", required=True, help="folder for the split, checkpoints, samples, logs and tables")
    add("--steps_preseg", type=int, default=2000, help="optimizer steps of the pre-segmentation net")
    add("--steps_denoiser", type=int, default=2000, help="optimizer steps of the denoising net")
    add("--steps_diffusion", type=int, default=20000, help="optimizer steps of the diffusion UNet")
    add("--image_size", type=int, default=128, help="input side of all three networks")
    add("--num_channels", type=int, default=64, help="base width of the diffusion UNet")
    add("--num_res_blocks", type=int, default=2, help="residual blocks per level of the diffusion UNet")
    add("--attention_resolutions", default="16",
        help="feature-map sizes with self-attention in the diffusion UNet")
    add("--base_channels", type=int, default=32, help="base width of the pre-segmentation and denoising U-Nets")
    add("--batch_size", type=int, default=12, help="batch of the pre-segmentation and denoising nets")
    add("--diffusion_batch_size", type=int, default=8, help="batch of the diffusion UNet")
    add("--diffusion_lr", type=float, default=1e-4, help="learning rate of the diffusion UNet")
    add("--ema_rate", type=float, default=0.0,
        help="EMA rate of the diffusion UNet; 0 = min(0.9999, 1 - 10 / --steps_diffusion), so "
        "that the average forgets the initial weights within a short run")
    add("--diffusion_steps", type=int, default=1000, help="number of steps N of the diffusion chain")
    add("--noise_schedule", default="cosine", help="beta schedule (linear or cosine)")
    add("--pre_t", type=int, default=300, help="addpm: level where the noised pre-segmentation enters")
    add("--T", type=int, default=250, help="addpm: level where the denoising net takes over")
    add("--ddpm_steps", type=int, default=0,
        help="UNet evaluations per member of the ddpm baseline (a respaced chain); 0 = the full chain")
    add("--ddim_steps", type=int, default=100, help="UNet evaluations per member of the ddim baseline")
    add("--num_ensemble", type=int, default=5, help="samples per image for every sampler")
    add("--sample_batch_size", type=int, default=1, help="images per sampling batch")
    add("--test_fraction", type=float, default=0.2, help="fraction of the patients held out for testing")
    add("--val_fraction", type=float, default=0.1,
        help="fraction of the training patients each trainer holds out for validation")
    add("--split_seed", type=int, default=0, help="seed of the patient split and of --max_test_cases")
    add("--max_test_cases", type=int, default=0, help="test on at most this many records (0 = all)")
    add("--seed", type=int, default=0, help="seed of the trainers and the samplers")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--fresh", action="store_true", help="delete the previous results in --out and start over")
    return parser


def check_args(args) -> None:
    positive = ("steps_preseg", "steps_denoiser", "steps_diffusion", "image_size", "num_channels",
                "num_res_blocks", "base_channels", "batch_size", "diffusion_batch_size",
                "num_ensemble", "sample_batch_size", "ddim_steps", "diffusion_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("ddpm_steps", "max_test_cases"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ConfigError(f"--test_fraction must lie in (0, 1), got {args.test_fraction}")
    if not 0 <= args.T < args.pre_t < args.diffusion_steps:
        raise ConfigError(
            f"--pre_t {args.pre_t} and --T {args.T} must satisfy 0 <= T < pre_t < "
            f"--diffusion_steps {args.diffusion_steps}"
        )
    if not 0.0 <= args.ema_rate < 1.0:
        raise ConfigError(f"--ema_rate must lie in [0, 1), got {args.ema_rate}")


def ema_rate(args) -> float:
    if args.ema_rate > 0:
        return args.ema_rate
    return round(min(0.9999, max(0.9, 1.0 - 10.0 / args.steps_diffusion)), 6)


# ---------------------------------------------------------------- phase 1: the patient split


def split_patients(patients: list[str], test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test) patient ids: a seeded shuffle, round(fraction * n) test patients (at least
    one on each side)."""
    if len(patients) < 2:
        raise BenchError(f"the data holds {len(patients)} labelled patient(s); a split needs at least 2")
    order = sorted(patients)
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
    return sorted(order[n_test:]), sorted(order[:n_test])


def _link(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        os.symlink(os.path.abspath(target), link)


def mirror(records, base: str, layout_files: list[str], dest: Path) -> None:
    """Symbolic links to every file of ``records`` under ``dest`` at its path relative to
    ``base``, and to the layout files (dataset.json and the like)."""
    for record in records:
        for path in list(record.image_files) + [record.label_file]:
            _link(path, dest / os.path.relpath(path, base))
    for path in layout_files:
        _link(path, dest / os.path.relpath(path, base))


def _layout_files(base: str, root: str) -> list[str]:
    """Files beside the data that describe it (not images or NIfTI volumes) in ``base`` and
    ``root``, e.g. nnU-Net's dataset.json."""
    found = []
    for folder in dict.fromkeys((base, root)):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.startswith(".") and not is_image(name) and not is_nifti(name):
                found.append(path)
    return found


def make_split(args, out: Path) -> dict:
    """Mirror the train and test records into ``out/split``; returns the split's description."""
    found = scan(args.data_dir, args.dataset, mask_suffix=args.mask_suffix)
    labelled = [r for r in found.records if r.label_file]
    if not labelled:
        raise BenchError(f"--data_dir {args.data_dir}: no record has a label; the benchmark needs labels")
    train_ids, test_ids = split_patients(sorted({r.patient_id for r in labelled}),
                                         args.test_fraction, args.split_seed)
    test_set = set(test_ids)
    train = [r for r in labelled if r.patient_id not in test_set]
    test = [r for r in labelled if r.patient_id in test_set]
    n_test_all = len(test)
    if args.max_test_cases and len(test) > args.max_test_cases:
        keep = set(random.Random(args.split_seed).sample(range(len(test)), args.max_test_cases))
        test = [r for i, r in enumerate(test) if i in keep]
    files = [f for r in labelled for f in list(r.image_files) + [r.label_file]]
    base = os.path.commonpath([found.root] + [os.path.abspath(f) for f in files])
    layout_files = _layout_files(base, found.root)
    split_dir = out / "split"
    data_rel = os.path.relpath(found.root, base)
    for part, records in (("train", train), ("test", test)):
        mirror(records, base, layout_files, split_dir / part)
    description = {
        "data_dir": found.root,
        "layout": found.layout,
        "records": len(found.records),
        "unlabelled_records_left_out": len(found.records) - len(labelled),
        "patients": {"train": len(train_ids), "test": len(test_ids)},
        "cases": {"train": len(train), "test": len(test), "test_before_max_test_cases": n_test_all},
        "test_patients": test_ids,
        "test_cases_per_patient": dict(sorted(Counter(r.patient_id for r in test).items())),
        "train_dir": str(split_dir / "train" / data_rel),
        "test_dir": str(split_dir / "test" / data_rel),
    }
    write_summary_json(description, split_dir / "split.json")
    return description


# ---------------------------------------------------------------- phases 2-3: the scripts


def run_phase(name: str, command: list[str], out: Path) -> float:
    """Run one script with its output in OUT/logs/<name>.log; returns its wall time (s)."""
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: running (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        code = subprocess.call(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        sys.stderr.write("\n".join(lines[-LOG_TAIL_LINES:]) + "\n")
        raise BenchError(f"phase {name} failed with exit code {code}; see {log_path}")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def data_flags(args, data_dir: str) -> list[str]:
    flags = ["--data_dir", data_dir, "--dataset", args.dataset, "--mask_suffix", args.mask_suffix,
             "--image_size", str(args.image_size), "--resize_mode", args.resize_mode]
    if args.foreground_labels:
        flags += ["--foreground_labels", args.foreground_labels]
    return flags


def train_commands(args, train_dir: str, runs: Path) -> dict:
    common = data_flags(args, train_dir) + [
        "--split_by", "patient", "--val_fraction", str(args.val_fraction),
        "--split_seed", str(args.split_seed), "--seed", str(args.seed), "--device", args.device,
        "--resume", "auto",
    ]
    supervised = ["--base_channels", str(args.base_channels), "--batch_size", str(args.batch_size),
                  "--max_epoch", "0", "--save_interval", "0", "--log_interval", "100"]
    chain = ["--diffusion_steps", str(args.diffusion_steps), "--noise_schedule", args.noise_schedule]
    py = sys.executable
    return {
        "train_preseg": [py, "train_preseg_network.py", *common, *supervised,
                         "--max_steps", str(args.steps_preseg), "--out_dir", str(runs / "preseg")],
        "train_denoiser": [py, "train_denoising_network.py", *common, *supervised, *chain,
                           "--T", str(args.T), "--max_steps", str(args.steps_denoiser),
                           "--out_dir", str(runs / "denoiser")],
        "train_diffusion": [
            py, "train_addpm.py", *common, *chain,
            "--num_channels", str(args.num_channels), "--num_res_blocks", str(args.num_res_blocks),
            "--num_heads", "1", "--attention_resolutions", args.attention_resolutions,
            "--learn_sigma", "False", "--use_scale_shift_norm", "False",
            "--rescale_learned_sigmas", "False", "--rescale_timesteps", "False",
            "--lr", str(args.diffusion_lr), "--batch_size", str(args.diffusion_batch_size),
            "--ema_rate", str(ema_rate(args)), "--max_steps", str(args.steps_diffusion),
            "--log_interval", "100", "--save_interval", str(max(1000, args.steps_diffusion // 10)),
            "--progress", "False", "--out_dir", str(runs / "addpm"),
        ],
    }


def run_names(args) -> dict:
    """Table row name -> sampler; names carry the steps each sampler walks."""
    ddpm = args.ddpm_steps or args.diffusion_steps
    return {"preseg": "preseg", f"ddpm-{ddpm}": "ddpm", f"ddim-{args.ddim_steps}": "ddim",
            f"addpm-{args.pre_t}-{args.T}": "addpm"}


def sample_command(args, sampler: str, test_dir: str, runs: Path, out_dir: Path) -> list[str]:
    def checkpoint(folder: Path) -> str:
        best = folder / "best.pt"
        return str(best if best.is_file() else folder / "final.pt")

    steps = {"ddpm": args.ddpm_steps, "ddim": args.ddim_steps}.get(sampler, 0)
    return [
        sys.executable, "sample.py", *data_flags(args, test_dir),
        "--model_path", str(runs / "addpm" / "final.pt"),
        "--preseg_path", checkpoint(runs / "preseg"),
        "--denoiser_path", checkpoint(runs / "denoiser"),
        "--sampler", sampler, "--sampling_steps", str(steps),
        "--pre_t", str(args.pre_t), "--T", str(args.T),
        "--num_ensemble", str(args.num_ensemble), "--batch_size", str(args.sample_batch_size),
        "--seed", str(args.seed), "--device", args.device, "--out_dir", str(out_dir),
    ]


# ---------------------------------------------------------------- bookkeeping and report


SETTINGS_EXCLUDED = ("fresh", "out")


def settings_of(args) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in SETTINGS_EXCLUDED}
    settings["data_dir"] = os.path.abspath(args.data_dir)
    return settings


def prepare_out(args, out: Path) -> dict:
    """Create OUT, or check that the run it holds had the same settings; returns the phase
    times recorded so far."""
    settings_path = out / "settings.json"
    if args.fresh:
        for name in ("split", "runs", "samples", "logs", "settings.json", "phases.json",
                     "table.md", "table.json"):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(settings_of(args))):
            changed = sorted(k for k in set(previous) | set(settings_of(args))
                             if previous.get(k) != settings_of(args).get(k))
            raise BenchError(
                f"--out {out} holds a run with other settings ({', '.join(changed)}); "
                "choose another --out or pass --fresh"
            )
    elif out.exists() and any(out.iterdir()):
        raise BenchError(f"--out {out} exists and is not a benchmark folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_summary_json(settings_of(args), settings_path)
    phases_path = out / "phases.json"
    return json.loads(phases_path.read_text(encoding="utf-8")) if phases_path.is_file() else {}


def hardware(device_flag: str) -> str:
    """The machine in words: CPU cores, and the GPU name when a CUDA device is used."""
    words = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    if device_flag != "cpu" and torch.cuda.is_available():
        words += f"; GPU {torch.cuda.get_device_name(0)}"
    return words


def budget_lines(args, split: dict, phases: dict, device: str) -> list[str]:
    ddpm = args.ddpm_steps or args.diffusion_steps
    total = sum(phases.values())
    lines = [
        f"data: {split['data_dir']} ({split['layout']}); split by patient with seed {args.split_seed}: "
        f"{split['patients']['train']} training patients ({split['cases']['train']} cases), "
        f"{split['patients']['test']} test patients ({split['cases']['test']} test cases"
        + (f" of {split['cases']['test_before_max_test_cases']}" if args.max_test_cases else "") + ")",
        f"budget: preseg {args.steps_preseg} steps, denoiser {args.steps_denoiser} steps "
        f"(base channels {args.base_channels}, batch {args.batch_size}); diffusion UNet "
        f"{args.steps_diffusion} steps (num_channels {args.num_channels}, {args.num_res_blocks} res "
        f"blocks, batch {args.diffusion_batch_size}, lr {args.diffusion_lr:g}, EMA {ema_rate(args):g}); "
        f"image size {args.image_size}",
        f"chain: {args.diffusion_steps} steps, {args.noise_schedule}; addpm pre_t {args.pre_t} -> T {args.T}; "
        f"ddpm {ddpm} steps; ddim {args.ddim_steps} steps; {args.num_ensemble} ensemble members",
        f"device: {device} ({hardware(args.device)})",
        "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + f"; total {total:.0f} s",
    ]
    return lines


def main(argv=None) -> dict:
    args = create_argparser().parse_args(argv)
    check_args(args)
    out = Path(args.out).resolve()
    phases = prepare_out(args, out)

    def record(name: str, seconds: float) -> None:
        phases[name] = seconds
        write_summary_json(phases, out / "phases.json")

    split_path = out / "split" / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text(encoding="utf-8"))
        print(f"split: reusing {split_path}")
    else:
        start = time.perf_counter()
        split = make_split(args, out)
        record("split", time.perf_counter() - start)
    print(f"split: {split['patients']['train']} training / {split['patients']['test']} test patients, "
          f"{split['cases']['train']} / {split['cases']['test']} cases", flush=True)

    runs = out / "runs"
    for name, command in train_commands(args, split["train_dir"], runs).items():
        folder = Path(command[command.index("--out_dir") + 1])
        if (folder / "final.pt").is_file() and name in phases:
            print(f"{name}: reusing {folder / 'final.pt'}")
            continue
        record(name, run_phase(name, command, out))

    run_dirs = {}
    for row, sampler in run_names(args).items():
        sample_dir = out / "samples" / row
        run_dirs[row] = sample_dir
        if (sample_dir / "summary.json").is_file() and f"sample_{row}" in phases:
            print(f"sample_{row}: reusing {sample_dir}")
            continue
        command = sample_command(args, sampler, split["test_dir"], runs, sample_dir)
        record(f"sample_{row}", run_phase(f"sample_{row}", command, out))

    rows = compare_runs(run_dirs)
    device = ", ".join(sorted({str(r["device"]) for r in rows}))
    lines = budget_lines(args, split, phases, device)
    table = format_table(rows)
    text = "\n".join(f"- {line}" for line in lines) + "\n\n" + table
    (out / "table.md").write_text(text, encoding="utf-8")
    report = {"settings": settings_of(args), "split": split, "wall_seconds": phases,
              "device": device, "hardware": hardware(args.device), "runs": rows}
    write_summary_json(report, out / "table.json")
    print()
    print(text, end="")
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}")
    return report


if __name__ == "__main__":
    run_cli(main)
