"""Small neural-network helpers shared by the UNet and the diffusion code.

The layer factories keep the module layout of improved-/guided-diffusion (``conv_nd``,
``normalization``, ``zero_module``), so that models built from them carry the same
parameter names and initialisation as that family of code.
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

# improved-/guided-diffusion normalise with 32 groups everywhere.
NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes its statistics in at least float32.

    Half-precision variance over large groups loses too much precision, so fp16 and bf16
    inputs are promoted to float32 and the result cast back to the input's dtype; float32
    and float64 inputs are normalised as they are (no copies, and a float64 model stays
    float64).

    Shapes: x [B, C, ...] -> [B, C, ...].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(at_least_float32(x)).type(x.dtype)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is fp16 or bf16, else ``x`` itself (float32, float64: no copy)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: ``GroupNorm32`` over ``channels`` channels.

    32 groups as improved-/guided-diffusion use. A channel count that 32 does not divide
    (which that code cannot build at all, e.g. the tiny widths of tests) gets
    ``gcd(32, channels)`` groups instead; the parameters (``weight``, ``bias`` of shape
    [channels]) are the same either way.
    """
    return GroupNorm32(math.gcd(NORM_GROUPS, channels), channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution (``nn.Conv1d/2d/3d``) with the given arguments."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported number of spatial dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Linear:
    """A fully connected layer (``nn.Linear``)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling layer (``nn.AvgPool1d/2d/3d``)."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported number of spatial dimensions: {dims}")


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it.

    Used on the last convolution of each residual branch and of the output head, so that a
    fresh block is the identity and a fresh model outputs zeros.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of ``module`` by ``scale`` and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    The first half of the channels are cosines, the second half sines, at frequencies
    ``max_period ** (-i / half)`` for i = 0 .. half-1 (improved-diffusion's layout); an odd
    ``dim`` gets one trailing zero channel.

    Shapes: timesteps [B] -> [B, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func: Callable, inputs: Sequence[torch.Tensor], flag: bool):
    """Evaluate ``func(*inputs)``, recomputing its activations in the backward pass if ``flag``.

    Gradient checkpointing trades compute for memory. It only matters when a graph is
    being recorded, so under ``torch.no_grad()`` the function is simply called. The
    non-reentrant implementation handles parameters and keyword-free closures without
    having to list them, and restores the RNG state so dropout masks match.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
