"""Run reports (the header and closing line of every script), and README.md against the runs'
own tables."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.report import results_text, summarize
from guided_diffusion import run_report

REPO_ROOT = Path(__file__).resolve().parents[1]


def sync_readme(*args) -> subprocess.CompletedProcess:
    """docs/sync_readme.py as run.sh and a maintainer run it."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "docs" / "sync_readme.py"), *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_header_aligns_its_fields_and_leaves_out_empty_ones():
    text = run_report.header("sampling", [("device", "cpu, fp32, 1 process"), ("checkpoints", ""),
                                          ("out_dir", "OUT")])
    assert text.splitlines() == ["sampling", "  device   cpu, fp32, 1 process", "  out_dir  OUT"]


@pytest.mark.parametrize("seconds, text", [(0.42, "0.4 s"), (28.4, "28 s"), (566, "9 min 26 s"),
                                           (7530, "2 h 05 min")])
def test_durations(seconds, text):
    assert run_report.duration(seconds) == text


def test_training_closing_reads_the_last_loss_of_progress_csv(tmp_path):
    with open(tmp_path / "progress.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["step", "loss", "val_dice"], [100, 0.9, ""], [200, 0.5, 0.8]])
    line = run_report.training_closing(
        "preseg training", seconds=65, step=200, out_dir=str(tmp_path), final_path="R/final.pt",
        val_score=0.8, best_score=0.85, best_step=150, best_path="R/best.pt")
    assert line == ("preseg training done in 1 min 5 s: step 200; loss 0.5000; validation Dice 0.8000 (best "
                    f"0.8500 at step 150); checkpoint R/final.pt; best R/best.pt; logs and curves.png in {tmp_path}")
    bare = run_report.training_closing("diffusion training", seconds=3, step=2, out_dir=str(tmp_path / "none"),
                                       final_path="F")
    assert bare == f"diffusion training done in 3.0 s: step 2; checkpoint F; logs and curves.png in {tmp_path / 'none'}"


def case_row(case_id, dice, voxels, patient="p1"):
    return {"case_id": case_id, "group_id": patient, "kind": "case", "dice": dice, "pred_voxels": voxels,
            "label_voxels": voxels}


def test_results_text_of_scored_and_unlabelled_runs():
    rows = [case_row("a", 0.8, 5), case_row("b", 0.6, 5), case_row("c", 1.0, 0),
            {**case_row("p1", 0.7, 10), "kind": "patient"}]
    summary = summarize(rows)
    assert results_text(summary) == ("mean dice per patient 0.7000 (1 patient); per case 0.7000 (3 cases, "
                                     "1 both empty left out)")
    assert results_text({**summary, "n_unlabelled": 2}).endswith("; unlabelled: 2 cases (no metrics)")
    assert results_text({**summarize([]), "n_unlabelled": 1}) == "unlabelled: 1 case (no metrics)"


def test_readme_holds_the_demo_run_s_own_table():
    """README.md's demo table is docs/demo/table.md (the run's table.md) verbatim."""
    proc = sync_readme("--check")
    assert proc.returncode == 0, proc.stderr
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = (REPO_ROOT / "docs" / "demo" / "table.md").read_text(encoding="utf-8")
    assert f"<!-- include docs/demo/table.md -->\n{table}<!-- end include -->" in readme
    for picture in ("docs/demo/overlay.png", "docs/demo/curves.png"):
        assert f"]({picture})" in readme and (REPO_ROOT / picture).is_file()


def test_sync_rewrites_a_stale_block_and_check_names_it(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- include t.md -->\n| a |\n|---|\n| 0 |\n<!-- end include -->\nrest\n")
    stale = sync_readme("--readme", readme, "--check")
    assert stale.returncode == 1 and "the block of t.md differs from the file" in stale.stderr
    assert "| 0 |" in readme.read_text()  # --check changes nothing
    assert sync_readme("--readme", readme).returncode == 0
    assert readme.read_text() == "intro\n<!-- include t.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nrest\n"
    assert sync_readme("--readme", readme, "--check").returncode == 0


def test_run_sh_keeps_every_progress_bar_on():
    script = (REPO_ROOT / "run.sh").read_text(encoding="utf-8")
    assert "--progress False" not in script and "--progress_steps" not in script
