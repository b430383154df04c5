"""Device choice, a real two-process torchrun on CPU (gloo), mixed precision and the logger."""

import csv
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from guided_diffusion import logger
from guided_diffusion.dist_util import (
    all_reduce_mean,
    autocast_context,
    make_grad_scaler,
    resolve_device,
    resolve_precision,
    setup_dist,
    wrap_model,
)
from guided_diffusion.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _fresh_logger():
    logger.reset()
    yield
    logger.reset()


def test_resolve_device_auto_and_cpu():
    if torch.cuda.is_available():
        expected = "cuda"
    elif torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_resolve_device_cuda_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    assert str(err.value) == "--device cuda: no CUDA device is available (use --device cpu or auto)"
    with pytest.raises(ConfigError, match="cuda:1"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("flag", ["gpu", "cuda:x", "", "tpu"])
def test_resolve_device_rejects_unknown_strings(flag):
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device(flag)


def test_single_process_creates_no_process_group(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx = setup_dist("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (0, 1, 0)
    assert ctx.is_main and not ctx.is_distributed and ctx.device.type == "cpu"
    assert not dist.is_initialized()
    # torchrun with a single process: still no group.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not setup_dist("cpu").is_distributed
    assert not dist.is_initialized()

    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model
    value = torch.tensor([1.0, 3.0])
    assert torch.equal(all_reduce_mean(value), value)


RANK_SCRIPT = """
import json
import sys

import torch

from guided_diffusion import dist_util, logger

out_dir = sys.argv[1]
ctx = dist_util.setup_dist("cpu")
logger.configure(dir=out_dir + "/logs", rank=ctx.rank, formats=("csv", "jsonl", "log"))
mean = dist_util.all_reduce_mean(torch.tensor([float(ctx.rank), 10.0 * ctx.rank]))
model = dist_util.wrap_model(torch.nn.Linear(3, 1), ctx)
model(torch.randn(4, 3)).sum().backward()
logger.logkv_mean("rank_mean", mean[0].item())
logger.logkv("world_size", ctx.world_size)
logger.log("hello from rank", ctx.rank)
logger.dumpkvs()
info = dict(
    rank=ctx.rank,
    world_size=ctx.world_size,
    local_rank=ctx.local_rank,
    distributed=ctx.is_distributed,
    wrapped=type(model).__name__,
    mean=mean.tolist(),
    group=torch.distributed.is_initialized(),
)
with open(f"{out_dir}/rank{ctx.rank}.json", "w") as f:
    json.dump(info, f)
dist_util.barrier()
dist_util.cleanup()
"""


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", "2", "--standalone",
            str(script), str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, info in enumerate(infos):
        assert info["rank"] == rank and info["local_rank"] == rank
        assert info["world_size"] == 2 and info["distributed"] and info["group"]
        assert info["wrapped"] == "DistributedDataParallel"
        # Both ranks agree on the mean of (0, 1) and (0, 10).
        assert info["mean"] == [0.5, 5.0]
    log_text = (tmp_path / "logs" / "log.txt").read_text()
    assert "hello from rank 0" in log_text and "hello from rank 1" not in log_text
    rows = list(csv.DictReader(open(tmp_path / "logs" / "progress.csv")))
    assert len(rows) == 1 and float(rows[0]["rank_mean"]) == 0.5
    assert len((tmp_path / "logs" / "progress.jsonl").read_text().splitlines()) == 1


def test_autocast_and_grad_scaler_on_cpu():
    assert isinstance(autocast_context("cpu", "fp32"), nullcontext)
    a = torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        autocast_context("cpu", "fp8")
    assert not make_grad_scaler("cpu", "fp32").is_enabled()
    assert not make_grad_scaler("cpu", "bf16").is_enabled()


def test_resolve_precision():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("fp32", use_fp16=True) == "fp16"
    assert resolve_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="--use_fp16"):
        resolve_precision("bf16", use_fp16=True)


def test_logger_writes_means_to_csv_and_jsonl(tmp_path, capsys):
    log_dir = tmp_path / "run"
    assert logger.configure(dir=log_dir) == str(log_dir)
    assert logger.get_dir() == str(log_dir)
    for value in (1.0, 2.0, 6.0):
        logger.logkv_mean("loss", value)
    logger.logkv_mean("mse", torch.tensor(0.25))
    logger.logkv("step", 10)
    assert logger.dumpkvs() == {"loss": pytest.approx(3.0), "mse": 0.25, "step": 10}
    # A new key in the second interval: the CSV header is rewritten, old rows padded.
    logger.logkv_mean("loss", 4.0)
    logger.logkv("step", 20)
    logger.logkv("grad_norm", 0.5)
    logger.dumpkvs()
    logger.log("finished", 2, "intervals")

    rows = list(csv.DictReader(open(log_dir / "progress.csv")))
    assert [float(r["loss"]) for r in rows] == [3.0, 4.0]
    assert [r["step"] for r in rows] == ["10", "20"]
    assert [r["grad_norm"] for r in rows] == ["", "0.5"]
    lines = [json.loads(line) for line in (log_dir / "progress.jsonl").read_text().splitlines()]
    assert lines == [{"loss": 3.0, "mse": 0.25, "step": 10}, {"grad_norm": 0.5, "loss": 4.0, "step": 20}]
    log_text = (log_dir / "log.txt").read_text()
    assert "finished 2 intervals" in log_text and "| loss" in log_text
    out = capsys.readouterr().out
    assert "| loss" in out and "finished 2 intervals" in out
    # The interval starts afresh after a dump.
    assert logger.dumpkvs() == {}


def test_logger_on_other_ranks_writes_nothing(tmp_path, capsys):
    log_dir = tmp_path / "rank1"
    logger.configure(dir=log_dir, rank=1)
    logger.logkv_mean("loss", 1.0)
    assert logger.dumpkvs() == {"loss": 1.0}
    logger.log("quiet")
    assert not log_dir.exists()
    assert capsys.readouterr().out == ""


def test_logger_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    assert logger.configure() == str(tmp_path / "from_env")
    assert logger.configure(dir=tmp_path / "explicit") == str(tmp_path / "explicit")
    monkeypatch.delenv("OPENAI_LOGDIR")
    monkeypatch.chdir(tmp_path)
    default = Path(logger.configure(formats=("csv",)))
    assert default.parent == tmp_path / "logs" and default.name.startswith("addpm-")
    assert default.is_dir()


def test_a_resumed_run_appends_to_the_progress_table(tmp_path):
    """A second process logging into the same folder (a resume) keeps the earlier rows."""
    for step in (1, 2):
        logger.configure(dir=str(tmp_path), rank=0, formats=("csv",))
        logger.logkv("step", step)
        logger.logkv("loss", 0.5 / step)
        logger.dumpkvs()
    logger.configure(dir=str(tmp_path), rank=0, formats=("csv",))
    logger.logkv("step", 3)
    logger.logkv("grad_norm", 1.0)
    logger.dumpkvs()
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["loss"] == "0.5" and rows[2]["grad_norm"] == "1.0" and rows[0]["grad_norm"] == ""
