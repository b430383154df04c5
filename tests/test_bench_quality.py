"""benchmarks.bench_quality end to end on tiny demo data (slow: every trainer and sampler runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_quality import main

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1", "--base_channels", "8",
        "--batch_size", "4", "--diffusion_batch_size", "4", "--steps_preseg", "6", "--steps_denoiser", "4",
        "--steps_diffusion", "4", "--diffusion_steps", "100", "--pre_t", "30", "--T", "25",
        "--val_sampling_steps", "2", "--val_max_cases", "4", "--few_steps", "2", "--num_ensemble", "1",
        "--sample_batch_size", "4", "--test_fraction", "0.25", "--val_fraction", "0.25", "--device", "cpu",
        "--jobs", "2"]


@pytest.mark.slow
def test_ablation_on_demo_data_pairs_rows_with_the_preseg_and_chooses_on_validation(tmp_path, capfd):
    subprocess.run([sys.executable, "-m", "data.demo", "--out", str(tmp_path / "demo"), "--n_train", "32",
                    "--n_test", "1", "--image_size", "32", "--seed", "0"], cwd=REPO_ROOT, check=True,
                   capture_output=True, timeout=120)
    out = tmp_path / "bench"
    report = main(["--data_dir", str(tmp_path / "demo" / "training"), "--out", str(out), *TINY])
    split = json.loads((out / "split" / "split.json").read_text())
    # 8 patients: 2 for testing; of the 6 others, the trainers hold out 2 for validation.
    assert split["patients"] == {"train": 6, "test": 2, "val": 2}
    assert not set(split["val_patients"]) & set(split["test_patients"])
    rows = {r["name"]: r for r in report["test"]}
    assert list(rows) == ["preseg", "addpm", "window", "window_preseg", "denoiser_image", "x0", "few_steps"]
    assert rows["preseg"]["paired"] is None
    for name in list(rows)[1:]:
        assert rows[name]["paired"]["kind"] == "patient" and rows[name]["paired"]["n_pairs"] == 2
    assert rows["few_steps"]["unet_evaluations_per_member"] == 2
    assert rows["x0"]["unet_evaluations_per_member"] == 6
    assert report["chosen_on_validation"] in rows and report["chosen_on_validation"] != "preseg"
    # The window UNets recorded their window; the pre-seg-aware one its start and x0 target.
    for name in ("unet_window", "unet_window_preseg"):
        assert (out / "runs" / name / "best.pt").is_file()
    table = (out / "table.md").read_text()
    assert "Chosen on the validation patients" in table and "Dice - preseg (paired, per patient)" in table
    # A rerun reuses every phase.
    capfd.readouterr()
    main(["--data_dir", str(tmp_path / "demo" / "training"), "--out", str(out), *TINY])
    printed = capfd.readouterr().out
    assert "running" not in printed and "unet_window_preseg: reusing" in printed
