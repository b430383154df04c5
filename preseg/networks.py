"""Registry of pre-segmentation networks, chosen by name (``--arch``).

Every network built here maps an image batch [B, C, H, W] to class logits [B, K, H, W] at the
input's own H and W (a plain Tensor, no softmax). ADDPM refines whatever pre-segmentation it is
given, so besides the built-ins any importable ``nn.Module`` can be plugged in:

* ``unet`` (default), ``attention_unet``, ``unetpp``: see preseg/unets.py; they take any H, W.
  Options: base_channels, depth, dropout (from the arguments of ``build_network``), and
  norm ("batch" | "group" | "instance"), upsample ("transpose" | "bilinear"); any of them may be
  set in ``arch_kwargs``, which takes precedence over the arguments.
* ``fcn_resnet50``, ``deeplabv3_resnet50``: torchvision's models, randomly initialised
  (``weights=None, weights_backbone=None``: nothing is downloaded), first convolution taking
  ``in_channels``, classifier ending in ``num_classes``, no auxiliary classifier. base_channels,
  depth and dropout do not apply to them and are ignored; they accept no ``arch_kwargs``.
* ``module:Class`` or ``package.module:Class`` (``Class`` may also be a factory function, or a
  dotted attribute path): imported and called with ``in_channels=C`` and ``num_classes=K``
  for each of the two names its signature lists explicitly, plus ``**arch_kwargs``; a
  constructor that names neither is called as ``Class(**arch_kwargs)``. base_channels, depth
  and dropout are not passed. Its forward must return logits [B, K, H, W] (a Tensor, or a dict
  holding it under "out" as torchvision's models do); this is checked once at build time on a
  dummy input of shape (2, C, 64, 64) in eval mode and again on every forward call.

Models know nothing of diffusion. User errors raise ``ConfigError`` with one line.
"""

import importlib
import inspect
import math
from collections.abc import Mapping

import torch
from torch import nn

from guided_diffusion.errors import ConfigError
from preseg.unets import NORMS, UPSAMPLES, AttentionUNet, UNet, UNetPlusPlus

DEFAULT_ARCH = "unet"
UNET_ARCHS = {"unet": UNet, "attention_unet": AttentionUNet, "unetpp": UNetPlusPlus}
TORCHVISION_ARCHS = ("fcn_resnet50", "deeplabv3_resnet50")
ARCH_CHOICES = tuple(UNET_ARCHS) + TORCHVISION_ARCHS
UNET_KWARGS = ("base_channels", "depth", "dropout", "norm", "upsample")
DATA_KWARGS = ("in_channels", "num_classes")
PROBE_SIZE = 64


def registry_help() -> str:
    """Help text for the ``--arch`` flag (and the keys ``--arch_kwargs`` takes)."""
    return (
        "pre-segmentation network: unet (default; U-Net), attention_unet (U-Net with attention "
        "gates on the skips), unetpp (nested U-Net, UNet++), fcn_resnet50 or deeplabv3_resnet50 "
        "(torchvision, randomly initialised, nothing downloaded), or module:Class / "
        "package.module:Class for any importable nn.Module mapping [B,C,H,W] images to "
        "[B,K,H,W] logits, built as Class(in_channels=C, num_classes=K, **arch_kwargs) (each of "
        "the two names passed only if the constructor's signature lists it). --arch_kwargs "
        f"(JSON) for the U-Nets: {', '.join(UNET_KWARGS)} (norm: {'|'.join(NORMS)}; upsample: "
        f"{'|'.join(UPSAMPLES)}); none for the torchvision models"
    )


def mask_probabilities(logits: torch.Tensor, exclusive: bool = True) -> torch.Tensor:
    """Logits -> per-channel probabilities [N, K, H, W] (float32), the mask channels that the
    diffusion model works in.

    exclusive: logits [N, K+1, H, W] of background and K classes -> their softmax without the
    background (K = 1: the foreground probability of a two-class net). Regions: logits
    [N, K, H, W] -> one sigmoid per region.
    """
    if exclusive:
        return torch.softmax(logits.float(), dim=1)[:, 1:]
    return torch.sigmoid(logits.float())


# Regions' sigmoids start at this foreground probability (the bias of the head), as RetinaNet's
# prior initialisation does: a head that starts at 0.5 everywhere spends a short training budget
# learning that most pixels are background, and until then a small region fires on all of them.
REGION_PRIOR = 0.01


def init_region_head(model: nn.Module, prior: float = REGION_PRIOR) -> bool:
    """Set the bias of a built-in network's last 1x1 convolution to ``logit(prior)``, for
    region logits that go through one sigmoid each (``mask_probabilities(exclusive=False)``).

    Returns False, changing nothing, for a ``module:Class`` network (whose head is unknown here).
    """
    if isinstance(model, TorchvisionSegmentationNet):
        head = model.net.classifier[-1]
    elif isinstance(model, tuple(UNET_ARCHS.values())):
        head = model.head
    else:
        return False
    with torch.no_grad():
        head.bias.fill_(math.log(prior / (1.0 - prior)))
    return True


def build_network(arch: str, *, in_channels: int, num_classes: int, base_channels: int = 32,
                  depth: int = 4, dropout: float = 0.0,
                  arch_kwargs: dict | None = None) -> nn.Module:
    """Build the pre-segmentation network named ``arch`` (see the module docstring).

    Args:
        arch: one of ARCH_CHOICES, or "module:Class" / "package.module:Class".
        in_channels: C, the image channels (from the data).
        num_classes: K, the number of output classes incl. background (2 for a binary mask).
        base_channels, depth, dropout: widths (level i has base_channels * 2**i channels),
            number of poolings and channel-dropout rate of the U-Nets.
        arch_kwargs: extra constructor options (parsed ``--arch_kwargs`` JSON).

    Returns:
        an nn.Module whose forward(x [B, C, H, W]) returns logits [B, K, H, W].

    Raises:
        ConfigError: unknown arch, unusable option, or a user module that cannot be imported,
            built, or does not return [B, K, H, W] logits.
    """
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if arch_kwargs is None:
        arch_kwargs = {}
    if not isinstance(arch_kwargs, Mapping):
        raise ConfigError(
            "--arch_kwargs must be a JSON object of keyword arguments, got "
            f"{type(arch_kwargs).__name__}"
        )
    arch_kwargs = dict(arch_kwargs)
    clashing = [key for key in DATA_KWARGS if key in arch_kwargs]
    if clashing:
        raise ConfigError(
            f"--arch_kwargs must not set {', '.join(clashing)}: in_channels and num_classes "
            "come from the data"
        )
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"--arch must be a non-empty string, got {arch!r}")
    if ":" in arch:
        return _build_external(arch, in_channels=in_channels, num_classes=num_classes,
                               arch_kwargs=arch_kwargs)
    if arch in UNET_ARCHS:
        _reject_unknown_keys(arch, arch_kwargs, UNET_KWARGS)
        options = {"base_channels": base_channels, "depth": depth, "dropout": dropout,
                   "norm": "batch", "upsample": "transpose", **arch_kwargs}
        return UNET_ARCHS[arch](in_channels=in_channels, num_classes=num_classes, **options)
    if arch in TORCHVISION_ARCHS:
        _reject_unknown_keys(arch, arch_kwargs, ())
        return TorchvisionSegmentationNet(arch, in_channels=in_channels, num_classes=num_classes)
    raise ConfigError(
        f"unknown --arch {arch!r}; choose one of {', '.join(ARCH_CHOICES)}, "
        "or module:Class for an importable nn.Module"
    )


def _reject_unknown_keys(arch: str, arch_kwargs: dict, allowed: tuple) -> None:
    unknown = sorted(set(arch_kwargs) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "none"
        raise ConfigError(
            f"--arch_kwargs key(s) {', '.join(unknown)} do not apply to --arch {arch} "
            f"(it takes: {takes})"
        )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class TorchvisionSegmentationNet(nn.Module):
    """torchvision's fcn_resnet50 / deeplabv3_resnet50, adapted to C input channels.

    Randomly initialised (no download); the ResNet's first convolution takes ``in_channels``,
    the classifier's last 1x1 convolution gives ``num_classes``; no auxiliary head. The
    wrapped model is ``self.net``.

    forward(x [B, in_channels, H, W]) -> logits [B, num_classes, H, W] (torchvision's "out",
    bilinearly upsampled from stride 8 to the input's size).
    """

    def __init__(self, name: str, *, in_channels: int, num_classes: int):
        super().__init__()
        try:
            from torchvision.models import segmentation
        except ImportError as exc:
            raise ConfigError(
                f"--arch {name} needs torchvision (pip install torchvision): {_first_line(exc)}"
            ) from exc
        if name not in TORCHVISION_ARCHS:
            raise ConfigError(f"unknown torchvision --arch {name!r}; choose one of "
                              f"{', '.join(TORCHVISION_ARCHS)}")
        self.name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        net = getattr(segmentation, name)(weights=None, weights_backbone=None,
                                          num_classes=num_classes, aux_loss=False)
        old = net.backbone.conv1
        conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                          stride=old.stride, padding=old.padding, bias=False)
        # Same initialisation torchvision's ResNet gives its own first convolution.
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        net.backbone.conv1 = conv1
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2 and self.name == "deeplabv3_resnet50":
            # The ASPP pooling branch normalises a 1x1 map: BatchNorm needs two samples.
            raise ConfigError(
                "--arch deeplabv3_resnet50 needs a batch of at least 2 in training "
                "(BatchNorm after global pooling); use --batch_size 2 or more"
            )
        return self.net(x)["out"]


class ExternalNetwork(nn.Module):
    """A user's nn.Module (``self.net``) whose output is checked to be [B, K, H, W] logits.

    forward(x [B, C, H, W]) -> logits [B, num_classes, H, W]; a dict output is unwrapped to its
    "out" entry. Any other output raises ConfigError naming ``arch``.
    """

    def __init__(self, arch: str, net: nn.Module, *, in_channels: int, num_classes: int):
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, Mapping) and "out" in out:
            out = out["out"]
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"--arch {self.arch} returns a {type(out).__name__} for an input of "
                f"{tuple(x.shape)}; expected a Tensor of [B, K, H, W] logits"
            )
        expected = (x.shape[0], self.num_classes, *x.shape[2:])
        if tuple(out.shape) != expected:
            raise ConfigError(
                f"--arch {self.arch} returns shape {tuple(out.shape)} for an input of "
                f"{tuple(x.shape)}; expected {expected} logits"
            )
        return out


def _resolve_target(arch: str):
    """Import ``module:Attr`` and return the attribute (a class or factory)."""
    module_name, _, attr_path = arch.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise ConfigError(
            f"--arch {arch!r} is not of the form module:Class or package.module:Class"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--arch {arch}: cannot import module {module_name!r} ({_first_line(exc)})"
        ) from exc
    target = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"--arch {arch}: module {module_name!r} has no attribute {attr_path!r}"
            )
        target = getattr(target, part)
    if isinstance(target, type) and not issubclass(target, nn.Module):
        raise ConfigError(f"--arch {arch}: {attr_path} is a class but not a torch.nn.Module")
    if not callable(target):
        raise ConfigError(
            f"--arch {arch}: {attr_path} is a {type(target).__name__}, not an nn.Module class"
        )
    return target


def _constructor_kwargs(target, *, in_channels: int, num_classes: int, arch_kwargs: dict) -> dict:
    """in_channels / num_classes for the names the signature lists explicitly, + arch_kwargs."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    accepted = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    kwargs = {}
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if name in params and params[name].kind in accepted:
            kwargs[name] = value
    kwargs.update(arch_kwargs)
    return kwargs


def _build_external(arch: str, *, in_channels: int, num_classes: int,
                    arch_kwargs: dict) -> ExternalNetwork:
    target = _resolve_target(arch)
    kwargs = _constructor_kwargs(target, in_channels=in_channels, num_classes=num_classes,
                                 arch_kwargs=arch_kwargs)
    call = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    attr_path = arch.partition(":")[2]
    try:
        net = target(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--arch {arch}: {attr_path}({call}) failed: {_first_line(exc)}") from exc
    if not isinstance(net, nn.Module):
        raise ConfigError(
            f"--arch {arch}: {attr_path}({call}) returned a {type(net).__name__}, not an nn.Module"
        )
    wrapped = ExternalNetwork(arch, net, in_channels=in_channels, num_classes=num_classes)
    _probe_output_shape(wrapped, arch, in_channels)
    return wrapped


def _probe_output_shape(wrapped: ExternalNetwork, arch: str, in_channels: int) -> None:
    """One dummy forward (eval mode, no grad) so a wrong output shape fails at build time."""
    param = next(wrapped.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(2, in_channels, PROBE_SIZE, PROBE_SIZE, device=device, dtype=dtype)
    was_training = wrapped.training
    wrapped.eval()
    try:
        with torch.no_grad():
            wrapped(x)
    except ConfigError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ConfigError(
            f"--arch {arch} fails on a dummy input of shape {tuple(x.shape)}: {_first_line(exc)}"
        ) from exc
    finally:
        wrapped.train(was_training)
