"""Does the diffusion stage improve on the pre-segmentation? An ablation on any labelled data.

    python -m benchmarks.bench_quality --data_dir DIR --out OUT [--dataset auto]
        [--steps_preseg 2000] [--steps_denoiser 2000] [--steps_diffusion 20000]
        [--image_size 128] [--num_channels 64] [--base_channels 32] [--num_ensemble 5]
        [--test_fraction 0.2] [--val_fraction 0.1] [--split_seed 0] [--jobs 1]
        [--rows preseg,addpm,window,window_preseg,denoiser_image,x0,few_steps] [--baselines ddpm,ddim]

Every row is a run of the real scripts (``sys.executable``) on one patient split and one
budget, and each row adds one change to the row above it:

    preseg          the pre-segmentation alone
    addpm           ADDPM as the paper: a UNet trained on the whole chain, pre_t -> T, denoiser
    window          the UNet trained on the levels T..pre_t only (--t_range)
    window_preseg   ... and pre-segmentation-aware (--train_start preseg, --predict_xstart True)
    denoiser_image  ... with a denoiser that also sees the image (--denoiser_cond image)
    x0              ... with the UNet's own x0 estimate at T as the final step
    few_steps       window_preseg's sampler with --sampling_steps K (--few_steps, default 10)

``--baselines ddpm,ddim`` adds Wolleb's ddpm and ddim from pure noise on the ``addpm`` UNet.

Phases:

1. split (``benchmarks.quality_split``): test patients held out, the trainers' validation
   patients mirrored so that they can be segmented too.
2. train: the pre-segmentation net, the denoisers and the diffusion UNets the rows need; each
   UNet validates every ``--val_interval`` steps on the validation patients (truncated sampler,
   ``best.pt`` by addpm Dice) and is sampled from its ``best.pt``.
3. sample: every row on the validation patients and on the test patients.
4. report: per-patient (or per-volume) Dice and HD95 with 95% intervals, the paired per-patient
   difference to ``preseg`` with its 95% interval, and each row's training wall time; the row
   chosen is the addpm row with the best validation Dice per patient, and its test figures are
   the headline. ``OUT/table.md`` holds the budget and both tables, ``OUT/table.json`` every
   number; both are printed.

``--jobs N`` runs up to N independent phases at once (one thread each is best on a CPU). Logs
go to ``OUT/logs``. A rerun with the same settings reuses finished phases, resumes interrupted
trainers (``--resume auto``) and samplers; ``--fresh`` starts over; a rerun with other settings
is refused.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.quality_split import BenchError, make_split
from data.layouts import DATASET_CHOICES
from evaluation.compare import compare_runs, format_table
from evaluation.report import write_summary_json
from guided_diffusion.errors import ConfigError
from guided_diffusion.script_util import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 15
BASELINE_ROW = "preseg"
# Row -> (UNet, denoiser or None, sampler flags) and what it adds to the row above.
ROWS = {
    "preseg": (None, None, ["--sampler", "preseg"], "the pre-segmentation alone"),
    "addpm": ("unet_chain", "denoiser", [], "UNet trained on the whole chain (the paper)"),
    "window": ("unet_window", "denoiser", [], "UNet trained on levels T..pre_t only"),
    "window_preseg": ("unet_window_preseg", "denoiser", [], "... and noised from the pre-segmentation"),
    "denoiser_image": ("unet_window_preseg", "denoiser_image", [], "... denoiser sees the image"),
    "x0": ("unet_window_preseg", None, ["--final_step", "x0"], "... UNet's x0 at T as final step"),
    "few_steps": ("unet_window_preseg", "denoiser", ["--sampling_steps", "FEW"], "window_preseg with --few_steps UNet evaluations"),
}
BASELINES = ("ddpm", "ddim")


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_quality",
        description="Train the ADDPM networks on a patient-wise split of any labelled dataset and "
        "compare the pre-segmentation, ADDPM and its variants, paired per patient.",
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
    add("--rows", default=",".join(ROWS), help=f"table rows, from: {', '.join(ROWS)}")
    add("--baselines", default="", help=f"extra rows from pure noise on the addpm UNet: {', '.join(BASELINES)}")
    add("--steps_preseg", type=int, default=2000, help="optimizer steps of the pre-segmentation net")
    add("--steps_denoiser", type=int, default=2000, help="optimizer steps of each denoising net")
    add("--steps_diffusion", type=int, default=20000, help="optimizer steps of each diffusion UNet")
    add("--image_size", type=int, default=128, help="input side of all networks")
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
    add("--t_range_mix", type=float, default=0.0,
        help="window rows: share of every batch trained on the whole chain")
    add("--preseg_fraction", type=float, default=0.5,
        help="window_preseg rows: share of every batch noised from the pre-segmentation")
    add("--val_interval", type=int, default=0,
        help="validate each UNet every this many steps; 0 = --steps_diffusion / 5")
    add("--val_sampling_steps", type=int, default=10, help="UNet evaluations per validation case")
    add("--val_max_cases", type=int, default=96, help="validation slices per validation run of a UNet")
    add("--few_steps", type=int, default=10, help="UNet evaluations per member of the few_steps row")
    add("--ddpm_steps", type=int, default=0,
        help="UNet evaluations per member of the ddpm baseline (a respaced chain); 0 = the full chain")
    add("--ddim_steps", type=int, default=100, help="UNet evaluations per member of the ddim baseline")
    add("--num_ensemble", type=int, default=5, help="samples per image for every sampler")
    add("--sample_batch_size", type=int, default=1, help="images per sampling batch")
    add("--test_fraction", type=float, default=0.2, help="fraction of the patients held out for testing")
    add("--val_fraction", type=float, default=0.1,
        help="fraction of the training patients held out for validation (settings are chosen there)")
    add("--split_seed", type=int, default=0, help="seed of the patient split and of --max_test_cases")
    add("--max_test_cases", type=int, default=0, help="test on at most this many records (0 = all)")
    add("--seed", type=int, default=0, help="seed of the trainers and the samplers")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--jobs", type=int, default=1, help="phases run at once (trainings and samplings that do not wait on each other)")
    add("--fresh", action="store_true", help="delete the previous results in --out and start over")
    return parser


def _names(text: str, known, flag: str) -> list:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def check_args(args) -> None:
    positive = ("steps_preseg", "steps_denoiser", "steps_diffusion", "image_size", "num_channels",
                "num_res_blocks", "base_channels", "batch_size", "diffusion_batch_size",
                "num_ensemble", "sample_batch_size", "ddim_steps", "diffusion_steps", "jobs", "few_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("ddpm_steps", "max_test_cases", "val_interval", "val_sampling_steps", "val_max_cases"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ConfigError(f"--test_fraction must lie in (0, 1), got {args.test_fraction}")
    if not 0.0 < args.val_fraction < 1.0:
        raise ConfigError(f"--val_fraction must lie in (0, 1): settings are chosen on validation patients, got {args.val_fraction}")
    if not 0 <= args.T < args.pre_t < args.diffusion_steps:
        raise ConfigError(
            f"--pre_t {args.pre_t} and --T {args.T} must satisfy 0 <= T < pre_t < "
            f"--diffusion_steps {args.diffusion_steps}"
        )
    if not 0.0 <= args.ema_rate < 1.0:
        raise ConfigError(f"--ema_rate must lie in [0, 1), got {args.ema_rate}")
    if args.few_steps > args.pre_t - args.T:
        raise ConfigError(f"--few_steps {args.few_steps} exceeds the {args.pre_t - args.T} levels of pre_t -> T")
    rows = _names(args.rows, ROWS, "--rows")
    if BASELINE_ROW not in rows:
        raise ConfigError(f"--rows must include {BASELINE_ROW}: every row is compared with it")
    _names(args.baselines, BASELINES, "--baselines")


def ema_rate(args) -> float:
    if args.ema_rate > 0:
        return args.ema_rate
    return round(min(0.9999, max(0.9, 1.0 - 10.0 / args.steps_diffusion)), 6)


# ---------------------------------------------------------------- phases


@dataclass
class Phase:
    """One run of a script: its command, the phases it waits for and the file that marks it done."""

    name: str
    command: list
    done_file: Path
    needs: list = field(default_factory=list)


def data_flags(args, data_dir: str) -> list[str]:
    flags = ["--data_dir", data_dir, "--dataset", args.dataset, "--mask_suffix", args.mask_suffix,
             "--image_size", str(args.image_size), "--resize_mode", args.resize_mode]
    if args.foreground_labels:
        flags += ["--foreground_labels", args.foreground_labels]
    return flags


def best_or_final(folder: Path) -> Path:
    best = folder / "best.pt"
    return best if best.is_file() else folder / "final.pt"


def training_phases(args, train_dir: str, runs: Path, needed: set) -> list:
    """The trainers the rows need; UNets validate with the preseg net and the plain denoiser."""
    common = data_flags(args, train_dir) + [
        "--split_by", "patient", "--val_fraction", str(args.val_fraction),
        "--split_seed", str(args.split_seed), "--seed", str(args.seed), "--device", args.device,
        "--resume", "auto",
    ]
    supervised = ["--base_channels", str(args.base_channels), "--batch_size", str(args.batch_size),
                  "--max_epoch", "0", "--save_interval", "0", "--log_interval", "100"]
    chain = ["--diffusion_steps", str(args.diffusion_steps), "--noise_schedule", args.noise_schedule]
    py = sys.executable
    window = ["--t_range", f"{args.T},{args.pre_t}", "--t_range_mix", str(args.t_range_mix)]
    unet_variants = {
        "unet_chain": [],
        "unet_window": window,
        "unet_window_preseg": [*window, "--train_start", "preseg", "--preseg_fraction",
                               str(args.preseg_fraction), "--predict_xstart", "True"],
    }
    phases = [Phase("preseg", [py, "train_preseg_network.py", *common, *supervised,
                               "--max_steps", str(args.steps_preseg), "--out_dir", str(runs / "preseg")],
                    runs / "preseg" / "final.pt")]
    for name, cond in (("denoiser", "none"), ("denoiser_image", "image")):
        if name in needed:
            phases.append(Phase(name, [py, "train_denoising_network.py", *common, *supervised, *chain,
                                       "--T", str(args.T), "--denoiser_cond", cond,
                                       "--max_steps", str(args.steps_denoiser), "--out_dir", str(runs / name)],
                                runs / name / "final.pt"))
    val_interval = args.val_interval or max(1, args.steps_diffusion // 5)
    for name, extra in unet_variants.items():
        if name not in needed:
            continue
        command = [
            py, "train_addpm.py", *common, *chain,
            "--num_channels", str(args.num_channels), "--num_res_blocks", str(args.num_res_blocks),
            "--num_heads", "1", "--attention_resolutions", args.attention_resolutions,
            "--learn_sigma", "False", "--class_cond", "False", "--use_scale_shift_norm", "False",
            "--rescale_learned_sigmas", "False", "--rescale_timesteps", "False",
            "--lr", str(args.diffusion_lr), "--batch_size", str(args.diffusion_batch_size),
            "--ema_rate", str(ema_rate(args)), "--max_steps", str(args.steps_diffusion),
            "--log_interval", "100", "--save_interval", str(max(1000, args.steps_diffusion // 10)),
            "--progress", "False", "--out_dir", str(runs / name), *extra,
            "--preseg_path", runs / "preseg", "--denoiser_path", runs / "denoiser",
            "--pre_t", str(args.pre_t), "--T", str(args.T), "--val_interval", str(val_interval),
            "--val_sampling_steps", str(args.val_sampling_steps), "--val_max_cases", str(args.val_max_cases),
        ]
        phases.append(Phase(name, command, runs / name / "final.pt", needs=["preseg", "denoiser"]))
    return phases


def row_specs(args) -> dict:
    """Table row -> (UNet, denoiser, sampler flags, description), rows then baselines."""
    specs = {}
    for row in _names(args.rows, ROWS, "--rows"):
        unet, denoiser, flags, words = ROWS[row]
        specs[row] = (unet, denoiser, [str(args.few_steps) if f == "FEW" else f for f in flags], words)
    for base in _names(args.baselines, BASELINES, "--baselines"):
        steps = args.ddpm_steps if base == "ddpm" else args.ddim_steps
        name = f"{base}-{steps or args.diffusion_steps}"
        specs[name] = ("unet_chain", None, ["--sampler", base, "--sampling_steps", str(steps)],
                       f"{base} from pure noise (addpm's UNet)")
    return specs


def sampling_phases(args, split: dict, runs: Path, samples: Path, specs: dict) -> list:
    """Every row on the validation patients and on the test patients."""
    phases = []
    for part in ("val", "test"):
        for row, (unet, denoiser, flags, _) in specs.items():
            out_dir = samples / part / row
            # The preseg row reads the pre-segmentation checkpoint alone.
            checkpoints = ["--preseg_path", runs / "preseg"]
            if unet:
                checkpoints += ["--model_path", runs / unet, "--denoiser_path", runs / (denoiser or "denoiser")]
            needs = ["preseg"] + [name for name in (unet, denoiser) if name]
            phases.append(Phase(f"sample_{part}_{row}", [
                sys.executable, "sample.py", *data_flags(args, split[f"{part}_dir"]), *checkpoints, *flags,
                "--pre_t", str(args.pre_t), "--T", str(args.T),
                "--num_ensemble", str(args.num_ensemble), "--batch_size", str(args.sample_batch_size),
                "--seed", str(args.seed), "--device", args.device, "--out_dir", str(out_dir),
            ], out_dir / "summary.json", needs=needs))
    return phases


CHECKPOINT_FLAGS = ("--model_path", "--preseg_path", "--denoiser_path")


def _resolve(command: list) -> list:
    """Checkpoint folders in a command -> their best.pt (else final.pt), known once the phases
    it needs have run."""
    resolved = []
    for previous, item in zip([None, *command], command):
        if isinstance(item, Path) and previous in CHECKPOINT_FLAGS:
            item = best_or_final(item)
        resolved.append(str(item))
    return resolved


def _start(phase: Phase, out: Path):
    log_path = out / "logs" / f"{phase.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = _resolve(phase.command)
    log = open(log_path, "w", encoding="utf-8")
    log.write(" ".join(command) + "\n\n")
    log.flush()
    print(f"[{time.strftime('%H:%M:%S')}] {phase.name}: running (log: {log_path})", flush=True)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, log_path, time.perf_counter()


def run_phases(phases: list, out: Path, jobs: int, finished: dict, record) -> None:
    """Run the phases not yet done, at most ``jobs`` at once, each after the phases it needs.

    ``finished``: the phase times recorded so far (a phase counts as done when it is there and
    its done file exists); ``record(name, seconds)`` is called as each phase ends.
    """
    pending = [p for p in phases if not (p.done_file.is_file() and p.name in finished)]
    for p in phases:
        if p not in pending:
            print(f"{p.name}: reusing {p.done_file}")
    done = {p.name for p in phases if p not in pending}
    running = {}
    try:
        while pending or running:
            ready = [p for p in pending if all(n in done for n in p.needs)]
            while ready and len(running) < jobs:
                phase = ready.pop(0)
                pending.remove(phase)
                running[phase.name] = (phase, *_start(phase, out))
            if not running:
                raise BenchError(f"phases {', '.join(p.name for p in pending)} wait on phases that never ran")
            time.sleep(1.0)
            for name, (phase, proc, log, log_path, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                seconds = time.perf_counter() - start
                if proc.returncode != 0:
                    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                    sys.stderr.write("\n".join(lines[-LOG_TAIL_LINES:]) + "\n")
                    raise BenchError(f"phase {name} failed with exit code {proc.returncode}; see {log_path}")
                print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {seconds:.0f} s", flush=True)
                record(name, seconds)
                done.add(name)
    finally:
        for _, proc, log, _, _ in running.values():
            proc.terminate()
            log.close()


# ---------------------------------------------------------------- bookkeeping and report


SETTINGS_EXCLUDED = ("fresh", "out", "jobs")


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
        current = json.loads(json.dumps(settings_of(args)))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
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


def _group_dice(row: dict) -> float:
    level = row["group"] or row["case"]
    mean = level["dice"]["mean"]
    return float("-inf") if mean is None else mean


def choose_row(val_rows: list) -> str:
    """The ADDPM row (not the pre-segmentation, not a baseline) with the best validation Dice
    per patient (per case where the data has no patients)."""
    candidates = [r for r in val_rows if r["name"] in ROWS and r["name"] != BASELINE_ROW]
    return max(candidates, key=_group_dice)["name"] if candidates else BASELINE_ROW


def training_seconds(specs: dict, phases: dict) -> dict:
    """Row -> wall time of the trainings it needs beyond the pre-segmentation (UNet + denoiser)."""
    return {row: sum(phases.get(n, 0.0) for n in (unet, denoiser) if n) for row, (unet, denoiser, _, _) in specs.items()}


def report_text(args, split: dict, phases: dict, specs: dict, test_rows, val_rows, chosen: str) -> str:
    total = sum(phases.values())
    seconds = training_seconds(specs, phases)
    lines = [
        f"data: {split['data_dir']} ({split['layout']}); split by patient with seed {args.split_seed}: "
        f"{split['patients']['train']} training patients ({split['cases']['train']} cases, of which "
        f"{split['patients']['val']} patients / {split['cases']['val']} cases held out for validation), "
        f"{split['patients']['test']} test patients ({split['cases']['test']} cases)",
        f"budget: preseg {args.steps_preseg} steps, each denoiser {args.steps_denoiser} steps (base "
        f"channels {args.base_channels}, batch {args.batch_size}); each diffusion UNet {args.steps_diffusion} "
        f"steps (num_channels {args.num_channels}, {args.num_res_blocks} res blocks, batch "
        f"{args.diffusion_batch_size}, lr {args.diffusion_lr:g}, EMA {ema_rate(args):g}); image size {args.image_size}",
        f"chain: {args.diffusion_steps} steps, {args.noise_schedule}; pre_t {args.pre_t} -> T {args.T}; window "
        f"{args.T}..{args.pre_t} (whole-chain share {args.t_range_mix:g}); pre-segmentation share "
        f"{args.preseg_fraction:g}; {args.num_ensemble} ensemble member(s)",
        f"device: {', '.join(sorted({str(r['device']) for r in test_rows}))} ({hardware(args.device)}); "
        f"--jobs {args.jobs}",
        "training wall time per row (UNet + denoiser; the pre-segmentation, "
        f"{phases.get('preseg', 0):.0f} s, is shared): "
        + ", ".join(f"{row} {s:.0f} s" for row, s in seconds.items()),
        f"total wall time {total:.0f} s",
    ]
    rows_doc = "\n".join(f"- `{row}`: {spec[3]}" for row, spec in specs.items())
    return (
        "\n".join(f"- {line}" for line in lines)
        + f"\n\nRows (each adds one change to the row above):\n{rows_doc}\n\n"
        + f"Chosen on the validation patients: **{chosen}** (best validation Dice per patient).\n\n"
        + "### Test patients\n\n" + format_table(test_rows, baseline=BASELINE_ROW)
        + "\n### Validation patients (where the row was chosen)\n\n" + format_table(val_rows, baseline=BASELINE_ROW)
    )


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
    print(f"split: {split['patients']['train']} training ({split['patients']['val']} of them for validation) / "
          f"{split['patients']['test']} test patients", flush=True)

    specs = row_specs(args)
    needed = {n for unet, denoiser, _, _ in specs.values() for n in (unet, denoiser) if n}
    if needed:
        needed.add("denoiser")  # the UNets validate with it
    runs, samples = out / "runs", out / "samples"
    plan = training_phases(args, split["train_dir"], runs, needed)
    plan += sampling_phases(args, split, runs, samples, specs)
    run_phases(plan, out, args.jobs, phases, record)

    test_rows = compare_runs({row: samples / "test" / row for row in specs}, baseline=BASELINE_ROW)
    val_rows = compare_runs({row: samples / "val" / row for row in specs}, baseline=BASELINE_ROW)
    chosen = choose_row(val_rows)
    text = report_text(args, split, phases, specs, test_rows, val_rows, chosen)
    (out / "table.md").write_text(text, encoding="utf-8")
    report = {"settings": settings_of(args), "split": split, "wall_seconds": phases,
              "training_seconds": training_seconds(specs, phases), "hardware": hardware(args.device),
              "chosen_on_validation": chosen, "test": test_rows, "val": val_rows}
    write_summary_json(report, out / "table.json")
    print()
    print(text, end="")
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}")
    return report


if __name__ == "__main__":
    run_cli(main)
