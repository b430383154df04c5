"""Training curves of several runs in one picture.

    python -m evaluation.plot RUN_DIR [RUN_DIR ...] [--labels a,b] [--out curves.png]

Each RUN_DIR is a trainer's output folder (its ``progress.csv``); the panels are those of the
``curves.png`` every trainer writes (loss, learning rate, validation Dice), one colour per run.
"""

import argparse
import os

from guided_diffusion.curves import plot_runs, read_progress
from guided_diffusion.errors import ConfigError
from guided_diffusion.script_util import run_cli


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer output folders (with progress.csv)")
    parser.add_argument("--labels", default="", help="comma-separated legend names, one per run (default: folder names)")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    return parser


def main(argv=None) -> str:
    args = create_argparser().parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else [
        os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels names {len(labels)} runs, but {len(args.runs)} were given")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two runs share a label ({', '.join(labels)}); give --labels")
    path = plot_runs({label: read_progress(run) for label, run in zip(labels, args.runs)}, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
