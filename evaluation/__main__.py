"""``python -m evaluation``: score a folder of predictions (see ``evaluation.cli``)."""

from evaluation.cli import main
from guided_diffusion.script_util import run_cli

if __name__ == "__main__":
    run_cli(main)
