"""Training curves: the logger's curves.png and python -m evaluation.plot, checked as pictures."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import logger
from guided_diffusion.curves import plot_runs, read_progress
from guided_diffusion.errors import AddpmError

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, steps: int, with_validation: bool) -> Path:
    logger.configure(dir=str(folder), rank=0, formats=("csv", "curves"))
    for step in range(1, steps + 1):
        logger.logkv_mean("loss", 1.0 / step)
        logger.logkv("lr", 1e-3 * (1 - step / (steps + 1)))
        logger.logkv("step", step)
        if with_validation and step % 5 == 0:
            logger.logkv("val_addpm_dice", 0.5 + step / 100)
            logger.logkv("val_preseg_dice", 0.55)
        logger.dumpkvs()
    logger.draw_curves()
    logger.reset()
    return folder


def coloured_columns(path: Path) -> np.ndarray:
    """Columns of the picture that hold a saturated (non-grey) pixel: where curves are drawn."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    saturated = (rgb.max(axis=2) - rgb.min(axis=2)) > 60
    return np.flatnonzero(saturated.any(axis=0))


def test_logger_draws_loss_lr_and_validation_panels(tmp_path):
    run = write_run(tmp_path / "run", steps=20, with_validation=True)
    path = run / "curves.png"
    with Image.open(path) as picture:
        width, height = picture.size
    assert width > 2.5 * height  # three panels side by side
    columns = coloured_columns(path)
    # Curves in each third of the picture: loss, learning rate, validation Dice.
    for third in range(3):
        assert ((columns >= third * width / 3) & (columns < (third + 1) * width / 3)).any()
    rows = read_progress(str(run))
    assert [r["step"] for r in rows if "val_addpm_dice" in r] == [5.0, 10.0, 15.0, 20.0]


def test_without_validation_two_panels(tmp_path):
    run = write_run(tmp_path / "run", steps=6, with_validation=False)
    with Image.open(run / "curves.png") as picture:
        width, height = picture.size
    assert 1.5 * height < width < 2.8 * height


@pytest.mark.slow
def test_plot_cli_draws_several_runs_and_names_a_missing_one(tmp_path):
    a = write_run(tmp_path / "a", steps=10, with_validation=True)
    b = write_run(tmp_path / "b", steps=10, with_validation=False)
    out = tmp_path / "both.png"
    cmd = [sys.executable, "-m", "evaluation.plot", str(a), str(b), "--labels", "window,chain", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and len(coloured_columns(out)) > 0
    proc = subprocess.run([sys.executable, "-m", "evaluation.plot", str(tmp_path / "nowhere")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere' / 'progress.csv'} not found: "
                                                f"is {tmp_path / 'nowhere'} a training run folder?"]


def test_read_progress_of_a_folder_without_one(tmp_path):
    with pytest.raises(AddpmError, match="progress.csv not found"):
        read_progress(str(tmp_path))
    plot_runs({"empty": []}, str(tmp_path / "empty.png"))  # nothing logged yet: empty panels
    assert (tmp_path / "empty.png").is_file()
