"""Device choice, torchrun-based distributed training and mixed precision.

One process (``python train_addpm.py ...``) creates no process group. Under torchrun
(``torchrun --nproc_per_node 4 train_addpm.py ...``), detected by RANK / WORLD_SIZE /
LOCAL_RANK in the environment, each process joins a group (nccl on CUDA, gloo on CPU) and
uses the GPU of its local rank. Devices are never hidden by setting CUDA_VISIBLE_DEVICES
from code: that is the user's choice.
"""

import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from guided_diffusion.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and outputs."""
        return self.rank == 0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(flag: str) -> torch.device:
    """The device for ``--device``: auto | cpu | cuda | cuda:N | mps.

    auto picks CUDA if available, else MPS, else CPU. A device that is not available or an
    unknown string is a ConfigError naming the flag.
    """
    text = str(flag).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {flag}: no CUDA device is available (use --device cpu or auto)")
        if match.group(1) is None:
            return torch.device("cuda")
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"--device {flag}: only {count} CUDA device(s) visible (cuda:0 .. cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise ConfigError(f"--device {flag}: MPS is not available here (use --device cpu or auto)")
        return torch.device("mps")
    raise ConfigError(f"--device {flag!r}: expected auto, cpu, cuda, cuda:N or mps")


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun with several processes."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError(
            "RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers "
            f"({os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
            f"{os.environ.get('LOCAL_RANK')!r}); start with torchrun or unset them"
        ) from None
    return rank, world_size, local_rank


def setup_dist(device_flag: str = "auto") -> DistContext:
    """Pick the device and, under torchrun with several processes, join the process group.

    Under torchrun each process takes ``cuda:<LOCAL_RANK>`` (nccl) when the device is CUDA,
    else the CPU (gloo). One process (no torchrun, or WORLD_SIZE 1) creates no group.
    """
    device = resolve_device(device_flag)
    env = _torchrun_env()
    if env is None or env[1] <= 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return DistContext(rank=0, world_size=1, local_rank=0, device=device)

    rank, world_size, local_rank = env
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"--device {device_flag}: torchrun started local rank {local_rank} but only "
                f"{count} CUDA device(s) are visible (use fewer --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(
            f"--device {device_flag}: distributed training under torchrun supports CUDA and CPU "
            f"only, not {device.type}"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_model(model: nn.Module, ctx: DistContext, **ddp_kwargs) -> nn.Module:
    """Move ``model`` to ``ctx.device``; wrap it in DistributedDataParallel when distributed."""
    model = model.to(ctx.device)
    if not ctx.is_distributed:
        return model
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
        ddp_kwargs.setdefault("output_device", ctx.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Wait for every process; a no-op without a process group."""
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a new tensor; the input is not modified).

    Without a process group it returns a copy. Integer tensors are averaged as float64.
    """
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.double()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


# How long ``cleanup`` leaves the GIL to gloo's worker threads (see there).
GLOO_DRAIN_SECONDS = 0.2


def cleanup() -> None:
    """Leave the process group, if any (call at the end of a torchrun script).

    gloo's worker threads outlive ``destroy_process_group`` and may still be freeing the last
    collective, which takes the GIL when the collective was issued during backward (DDP). If
    the interpreter has begun to shut down by then, the process aborts ("terminate called
    without an active exception", pytorch/pytorch#190489), so a finished torchrun run would
    exit with SIGABRT. Sleeping releases the GIL and lets the workers finish first.
    """
    if not is_initialized():
        return
    gloo = dist.get_backend() == dist.Backend.GLOO
    dist.destroy_process_group()
    if gloo:
        time.sleep(GLOO_DRAIN_SECONDS)


def resolve_precision(precision: str, use_fp16: bool = False) -> str:
    """The precision from ``--precision`` and improved-diffusion's ``--use_fp16`` alias."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if use_fp16:
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"--use_fp16 True contradicts --precision {precision} (give one of them)")
        return "fp16"
    return precision


def autocast_context(device, precision: str):
    """Context manager for the forward pass: autocast for bf16 / fp16, nothing for fp32.

    bf16 runs on CPU and CUDA, fp16 on CUDA only (ConfigError elsewhere).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"--precision fp16 needs a CUDA device, the device is {device.type} "
                f"(use --precision bf16 or fp32)"
            )
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--precision bf16 runs on CPU or CUDA, not {device.type} (use --precision fp32)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this CUDA device does not support bfloat16 (use fp16 or fp32)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_grad_scaler(device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 and fp32 need none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
