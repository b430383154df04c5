"""Pre-segmentation networks and loss: shapes on odd sizes, the plug-in rule, clear errors."""

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.errors import ConfigError
from preseg import (
    ARCH_CHOICES,
    SegmentationLoss,
    build_network,
    dice_per_image,
    registry_help,
    soft_dice_score,
)
from preseg.networks import TorchvisionSegmentationNet

UNET_ARCHS = ("unet", "attention_unet", "unetpp")
TINY = {"base_channels": 4, "depth": 3}
SIZES = ((33, 47), (64, 64))


def assert_one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("arch", UNET_ARCHS)
@pytest.mark.parametrize("in_channels", (1, 3, 4))
def test_unet_family_keeps_any_input_size(arch, in_channels):
    net = build_network(arch, in_channels=in_channels, num_classes=2, **TINY)
    net.train()  # BatchNorm in training mode needs batch > 1
    for height, width in SIZES:
        out = net(torch.randn(2, in_channels, height, width))
        assert out.shape == (2, 2, height, width)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", UNET_ARCHS)
def test_unet_family_default_depth_odd_size_eval(arch):
    net = build_network(arch, in_channels=4, num_classes=3, base_channels=2).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 4, 41, 29))
    assert out.shape == (1, 3, 41, 29)


def test_unet_on_brats_like_odd_size():
    net = build_network("unet", in_channels=4, num_classes=2, base_channels=2, depth=4).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 4, 241, 199)).shape == (1, 2, 241, 199)


@pytest.mark.parametrize("norm", ("group", "instance"))
def test_unet_norm_and_upsample_options(norm):
    net = build_network("attention_unet", in_channels=1, num_classes=2, dropout=0.2,
                        arch_kwargs={"base_channels": 8, "depth": 2, "norm": norm,
                                     "upsample": "bilinear"})
    assert net.widths == [8, 16, 32]
    assert any(isinstance(m, torch.nn.Dropout2d) for m in net.modules())
    assert net(torch.randn(1, 1, 17, 23)).shape == (1, 2, 17, 23)


def test_unet_backward_reaches_every_parameter():
    net = build_network("unet", in_channels=3, num_classes=2, **TINY)
    logits = net(torch.randn(2, 3, 33, 47))
    loss = SegmentationLoss()(logits, torch.randint(0, 2, (2, 33, 47)))
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.fixture(scope="module")
def torchvision_nets():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return {arch: build_network(arch, in_channels=4, num_classes=2)
            for arch in ("fcn_resnet50", "deeplabv3_resnet50")}


@pytest.mark.parametrize("arch", ("fcn_resnet50", "deeplabv3_resnet50"))
def test_torchvision_models_forward_odd_size(arch, torchvision_nets):
    net = torchvision_nets[arch]
    assert isinstance(net, TorchvisionSegmentationNet)
    assert net.net.backbone.conv1.in_channels == 4
    assert net.net.classifier[-1].out_channels == 2
    assert net.net.aux_classifier is None
    net.train()
    out = net(torch.randn(2, 4, 33, 47))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 33, 47)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 4, 33, 47)).shape == (1, 2, 33, 47)


def test_deeplab_batch_of_one_in_training_is_a_clear_error(torchvision_nets):
    net = torchvision_nets["deeplabv3_resnet50"].train()
    with pytest.raises(ConfigError) as excinfo:
        net(torch.randn(1, 4, 33, 47))
    assert "--batch_size" in assert_one_line(excinfo)


@pytest.mark.parametrize("in_channels", (1, 3))
def test_torchvision_first_conv_adapts(in_channels):
    net = build_network("fcn_resnet50", in_channels=in_channels, num_classes=2).eval()
    assert net.net.backbone.conv1.weight.shape[1] == in_channels
    with torch.no_grad():
        assert net(torch.randn(1, in_channels, 33, 47)).shape == (1, 2, 33, 47)


def test_arch_choices_and_help():
    assert ARCH_CHOICES == ("unet", "attention_unet", "unetpp", "fcn_resnet50",
                            "deeplabv3_resnet50")
    text = registry_help()
    assert all(arch in text for arch in ARCH_CHOICES) and "module:Class" in text


USER_MODULE = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_channels, num_classes, hidden=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(hidden, num_classes, 1))

    def forward(self, x):
        return self.body(x)


class OwnNames(nn.Module):
    def __init__(self, channels_in=1, classes=2):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, classes, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class HalfSize(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes + 1, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


class FixedSize(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):
        return self.conv(x)[..., :64, :64]


def make_net(in_channels, num_classes):
    return TinyNet(in_channels, num_classes, hidden=2)


def make_string(in_channels):
    return "not a module"


class NotAModule:
    def __init__(self, in_channels, num_classes):
        pass
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A real module file and a package on sys.path; yields their import names."""
    suffix = tmp_path.name.replace("-", "_")
    module_name = f"user_segnets_{suffix}"
    package_name = f"user_segpkg_{suffix}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / package_name).mkdir()
    (tmp_path / package_name / "__init__.py").write_text("")
    (tmp_path / package_name / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module_name, f"{package_name}.nets"
    for name in (module_name, package_name, f"{package_name}.nets"):
        sys.modules.pop(name, None)


def test_user_module_class_with_data_names(user_module):
    module_name, package_module = user_module
    for arch in (f"{module_name}:TinyNet", f"{package_module}:TinyNet",
                 f"{module_name}:make_net"):
        net = build_network(arch, in_channels=3, num_classes=2, base_channels=64,
                            arch_kwargs={"hidden": 3} if arch.endswith("TinyNet") else None)
        assert net(torch.randn(2, 3, 33, 47)).shape == (2, 2, 33, 47)
    assert net.net.body[0].out_channels == 2


def test_user_module_with_own_names_gets_only_arch_kwargs(user_module):
    module_name, _ = user_module
    net = build_network(f"{module_name}:OwnNames", in_channels=4, num_classes=3,
                        arch_kwargs={"channels_in": 4, "classes": 3})
    out = net(torch.randn(1, 4, 33, 47))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 33, 47)


def test_user_module_wrong_shape_fails_at_build(user_module):
    module_name, _ = user_module
    arch = f"{module_name}:HalfSize"
    with pytest.raises(ConfigError) as excinfo:
        build_network(arch, in_channels=4, num_classes=2)
    assert assert_one_line(excinfo) == (
        f"--arch {arch} returns shape (2, 3, 32, 32) for an input of (2, 4, 64, 64); "
        "expected (2, 2, 64, 64) logits"
    )


def test_user_module_wrong_shape_on_other_sizes_fails_at_forward(user_module):
    module_name, _ = user_module
    net = build_network(f"{module_name}:FixedSize", in_channels=1, num_classes=2)
    with pytest.raises(ConfigError) as excinfo:
        net(torch.randn(1, 1, 80, 70))
    assert "expected (1, 2, 80, 70) logits" in assert_one_line(excinfo)


@pytest.mark.parametrize("attr, expected", [
    ("Missing", "has no attribute 'Missing'"),
    ("NotAModule", "not a torch.nn.Module"),
    ("make_string", "returned a str, not an nn.Module"),
    ("USER_NAME_THAT_IS_NOT_THERE.x", "has no attribute"),
])
def test_user_module_bad_targets(user_module, attr, expected):
    module_name, _ = user_module
    with pytest.raises(ConfigError) as excinfo:
        build_network(f"{module_name}:{attr}", in_channels=1, num_classes=2)
    assert expected in assert_one_line(excinfo)


def test_user_module_bad_kwargs(user_module):
    module_name, _ = user_module
    with pytest.raises(ConfigError) as excinfo:
        build_network(f"{module_name}:TinyNet", in_channels=1, num_classes=2,
                      arch_kwargs={"widht": 3})
    assert "widht" in assert_one_line(excinfo)


def test_missing_module_is_a_clear_error():
    with pytest.raises(ConfigError) as excinfo:
        build_network("no_such_segnet_pkg.models:Net", in_channels=1, num_classes=2)
    message = assert_one_line(excinfo)
    assert "cannot import module 'no_such_segnet_pkg.models'" in message


@pytest.mark.parametrize("arch", ("resnet_unet", "UNet", "", "mod:", ":Cls"))
def test_bad_arch_names(arch):
    with pytest.raises(ConfigError) as excinfo:
        build_network(arch, in_channels=1, num_classes=2)
    assert_one_line(excinfo)


def test_unknown_arch_lists_choices():
    with pytest.raises(ConfigError) as excinfo:
        build_network("resnet_unet", in_channels=1, num_classes=2)
    message = assert_one_line(excinfo)
    assert all(arch in message for arch in ARCH_CHOICES)


@pytest.mark.parametrize("arch, kwargs, expected", [
    ("unet", {"width": 8}, "width"),
    ("unetpp", {"norm": "layer"}, "norm"),
    ("unet", {"base_channels": 8.5}, "base_channels"),
    ("attention_unet", {"depth": 0}, "depth"),
    ("unet", {"dropout": 1.5}, "dropout"),
    ("unet", {"in_channels": 3}, "come from the data"),
    ("fcn_resnet50", {"base_channels": 8}, "takes: none"),
])
def test_bad_arch_kwargs(arch, kwargs, expected):
    with pytest.raises(ConfigError) as excinfo:
        build_network(arch, in_channels=1, num_classes=2, arch_kwargs=kwargs)
    assert expected in assert_one_line(excinfo)


def test_loss_of_perfect_logits_is_near_zero():
    target = torch.randint(0, 3, (2, 9, 11))
    target[0, 0, 0], target[0, 0, 1], target[0, 0, 2] = 0, 1, 2
    logits = 30.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    terms = SegmentationLoss().components(logits, target)
    assert terms["dice_loss"].item() < 1e-6
    assert terms["ce"].item() < 1e-6
    assert SegmentationLoss(ce_weight=0.0)(logits, target).item() < 1e-6


def test_loss_of_wrong_logits_is_high_and_gradient_finite():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    wrong = 30.0 * F.one_hot(1 - target, 2).permute(0, 3, 1, 2).float()
    assert SegmentationLoss(ce_weight=0.0)(wrong, target).item() > 0.99
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss = SegmentationLoss(ce_weight=1.0, dice_weight=0.5)(logits, target)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_soft_dice_hand_computed():
    probs = torch.tensor([0.5, 0.5, 0.0, 1.0]).view(1, 1, 2, 2)
    onehot = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    # 2 * (0.5 + 1) / (2 + 2) = 0.75
    assert soft_dice_score(probs, onehot, smooth=0.0).item() == pytest.approx(0.75)
    assert soft_dice_score(probs, onehot, dims=(2, 3)).shape == (1, 1)


def test_dice_per_image_hand_computed_and_empty_masks():
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # 4 pixels
    pred[0, :2, :1] = 1    # 2 pixels, all inside -> 2*2 / (2+4)
    pred[2, 0, 0] = 1      # image 1: both empty -> 1; image 2: reference empty -> 0
    dice = dice_per_image(pred, target, num_classes=2)
    assert dice.shape == (3, 1) and dice.dtype == torch.float32
    assert dice[:, 0].tolist() == pytest.approx([4 / 6, 1.0, 0.0])


def test_loss_rejects_bad_shapes_and_weights():
    with pytest.raises(ValueError):
        SegmentationLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ConfigError):
        SegmentationLoss(ce_weight=0.0, dice_weight=0.0)


@pytest.mark.parametrize("arch", ("unet", "attention_unet", "unetpp", "fcn_resnet50"))
def test_region_heads_start_at_the_background_prior(arch):
    """Regions' sigmoids start near 0.01 everywhere, not at 0.5 (see REGION_PRIOR)."""
    from preseg.networks import REGION_PRIOR, init_region_head

    net = build_network(arch, in_channels=4, num_classes=3, base_channels=8, depth=2).eval()
    assert init_region_head(net)
    with torch.no_grad():
        probs = torch.sigmoid(net(torch.zeros(2, 4, 32, 32)))
    assert probs.median().item() < 0.1
    heads = net.net.classifier[-1] if arch == "fcn_resnet50" else net.head
    assert torch.allclose(torch.sigmoid(heads.bias), torch.full((3,), REGION_PRIOR))


def test_region_head_of_a_user_module_is_left_alone(user_module):
    from preseg.networks import init_region_head

    module_name, _ = user_module
    net = build_network(f"{module_name}:TinyNet", in_channels=3, num_classes=2, arch_kwargs={"hidden": 3})
    before = [p.clone() for p in net.parameters()]
    assert not init_region_head(net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
