"""Shared test settings: small, single-threaded, deterministic."""

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
BRATS2D_MINI = SHARED_DIR / "fixtures" / "brats2d_mini"


@pytest.fixture(autouse=True)
def _single_thread_torch():
    # Two cores are shared by the whole suite; one thread per test keeps timings stable.
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture
def brats2d_mini():
    if not BRATS2D_MINI.is_dir():
        pytest.skip(f"fixture folder {BRATS2D_MINI} is missing (../shared beside the repo)")
    return BRATS2D_MINI
