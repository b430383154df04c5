"""The benchmark scripts as a user starts them: benchmarks/gpu_check.sh and the flags it passes on."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_sampling, bench_train

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def script_commands(module: str) -> list:
    """The argument lists gpu_check.sh passes to ``python -m <module>``."""
    text = GPU_CHECK.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("step ") and f"-m {module} " in line:
            rest = line.split(f"-m {module} ", 1)[1].replace('${PEAK[@]+"${PEAK[@]}"}', "")
            commands.append(shlex.split(rest))
    return commands


def test_gpu_check_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_stops_in_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU_CHECK), str(out)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: benchmarks/gpu_check.sh needs a CUDA GPU: torch ")
    assert not out.exists()


def test_gpu_check_flags_are_accepted(monkeypatch):
    sampling = script_commands("benchmarks.bench_sampling")
    assert len(sampling) == 3
    for argv in sampling:
        monkeypatch.setattr(sys, "argv", ["bench_sampling", *argv])
        _, args = bench_sampling.parse_args()
        assert args.config and args.precision
    assert {"default", "small"} <= {c for argv in sampling for c in argv}
    training = script_commands("benchmarks.bench_train")
    assert len(training) == 1
    args = bench_train.create_argparser().parse_args(training[0])
    assert args.precision == "fp32,bf16" and args.device == "cuda"


def test_bench_sampling_refuses_unknown_rows(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_sampling", "--samplers", "addpm,flash"])
    with pytest.raises(SystemExit) as exc:
        bench_sampling.parse_args()
    assert exc.value.code == 2
    assert "--samplers: unknown flash" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sampling_runs_on_cpu():
    cmd = [sys.executable, "-m", "benchmarks.bench_sampling", "--device", "cpu", "--config", "small",
           "--precision", "fp32,bf16", "--samplers", "addpm,addpm-k5", "--repeats", "1", "--threads", "1",
           "--max_evals_measured", "2", "--memory_batches", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("reference (guided-diffusion)", "ours, fast path off", "ours, fast path", "addpm K=5 batched"):
        assert row in out
    assert "UNet forward, fast path vs reference at batch 1" in out
    assert "bf16 vs fp32" in out and "resident set after image 2" in out


def test_bench_sampling_mask_channels_flag(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_sampling", "--mask_channels", "1,3"])
    _, args = bench_sampling.parse_args()
    assert args.mask_channels == [1, 3]
    monkeypatch.setattr(sys, "argv", ["bench_sampling", "--mask_channels", "0"])
    with pytest.raises(SystemExit) as exc:
        bench_sampling.parse_args()
    assert exc.value.code == 2
    assert "--mask_channels must be comma-separated positive integers" in capsys.readouterr().err
