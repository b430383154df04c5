"""The diffusion UNet's fast path for sampling: each part behind a flag, with exact fallbacks.

    model = apply_fast_path(bundle.model, device, compile=False)   # what sample.py calls

Parts, and the defaults measured with ``python -m benchmarks.bench_sampling`` on a 2-core CPU
(README, "Fast path"):

- ``attention``: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``) or
  ``"einsum"`` (guided-diffusion's two einsums, the softmax in float32). ``"auto"`` takes
  einsum on CPU, where it measured as fast or faster at the UNet's sizes (there SDPA runs the
  same arithmetic through its unfused kernel), and SDPA elsewhere (fused kernels that never
  hold the T x T weights).
- ``channels_last``: NHWC weights and activations, so convolutions skip the layout reorders of
  every call (1.05-1.13x per forward on CPU, fp32).
- ``compile``: ``torch.compile`` of the UNet for the fixed-shape reverse loop. Off by default:
  on CPU compiling took 30-100 s and made a forward at most 1.2x faster (at 128x128 less
  than channels_last alone). Where compilation fails (no C++ compiler or Triton, an
  unsupported platform) the UNet runs eagerly after one warning.

bf16 autocast is the scripts' ``--precision`` flag, not a part of this function: it changes
the results beyond float tolerance. With ``enabled=False`` (and ``compile=False``) the UNet
computes exactly guided-diffusion's published function: einsum attention, NCHW, eager.
"""

import warnings

import torch

from guided_diffusion.unet import UNetModel

ATTENTION_CHOICES = ("auto", "sdpa", "einsum")


def resolve_attention(attention: str, device: torch.device) -> str:
    """The attention implementation for ``--attention`` on ``device`` ("auto": einsum on CPU)."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {attention!r} (choose one of {', '.join(ATTENTION_CHOICES)})")
    if attention == "auto":
        return "einsum" if torch.device(device).type == "cpu" else "sdpa"
    return attention


class CompiledUNet:
    """``torch.compile`` of a UNet, falling back to the eager UNet when compilation fails.

    Compilation happens lazily at the first call of each input shape, so that is where a
    missing compiler shows: the compiler's error becomes one warning, and every later call
    runs eagerly. Errors of the model itself (a bad input) pass through unchanged.
    """

    def __init__(self, model: torch.nn.Module):
        import torch._dynamo  # imported here: it is slow to import and only needed to compile

        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self._compiler_errors = torch._dynamo.exc.TorchDynamoException

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x, timesteps)
            except self._compiler_errors as err:
                lines = str(err).strip().splitlines()
                reason = lines[0][:200] if lines else ""
                warnings.warn(
                    f"torch.compile of the UNet failed ({type(err).__name__}: {reason}); "
                    "running it without compilation",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled = None
        return self.model(x, timesteps)


def apply_fast_path(
    model: UNetModel,
    device,
    *,
    enabled: bool = True,
    attention: str = "auto",
    channels_last: bool = True,
    compile: bool = False,
):
    """Prepare ``model`` (in place) for sampling on ``device`` and return what to call.

    :param enabled: False = guided-diffusion's computation (einsum attention, NCHW), whatever
        ``attention`` and ``channels_last`` say.
    :param compile: wrap the model in ``CompiledUNet``; ignored where torch.compile cannot
        run at all (``torch._dynamo.is_dynamo_supported()`` is False), with a warning.
    :return: ``model`` itself, or a ``CompiledUNet`` around it; either is called as
        ``f(x, timesteps)``.
    """
    model.set_attention(resolve_attention(attention, device) if enabled else "einsum")
    model.use_channels_last(enabled and channels_last)
    if not compile:
        return model
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported here; the UNet runs without compilation", RuntimeWarning)
        return model
    return CompiledUNet(model)
