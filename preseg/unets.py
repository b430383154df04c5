"""The U-Net family of pre-segmentation networks: U-Net, Attention U-Net and UNet++.

Each network maps an image batch ``x`` [B, C, H, W] to class logits [B, K, H, W] at the input's
own H and W, for any H and W: the input is padded (edge values replicated, split evenly between
both sides) to the next multiple of ``2 ** depth`` so that every pooling step halves an even
size, and the logits are cropped back to the input's grid.

Widths double per level: level ``i`` (0 = full resolution, ``depth`` = bottleneck) has
``base_channels * 2 ** i`` channels. Every level uses the same two-convolution block
(3x3 conv -> norm -> ReLU, twice).
"""

import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.errors import ConfigError

NORMS = ("batch", "group", "instance")
UPSAMPLES = ("transpose", "bilinear")
MAX_DEPTH = 8


def check_unet_options(*, base_channels, depth, dropout, norm, upsample) -> None:
    """Raise ConfigError (one line naming the option) for a value the U-Nets cannot take."""
    if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels < 1:
        raise ConfigError(
            f"base_channels (--base_channels or --arch_kwargs) must be a positive integer, "
            f"got {base_channels!r}"
        )
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ConfigError(
            f"depth (--depth or --arch_kwargs) must be an integer from 1 to {MAX_DEPTH}, "
            f"got {depth!r}"
        )
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
            or not 0.0 <= dropout < 1.0):
        raise ConfigError(
            f"dropout (--dropout or --arch_kwargs) must be a number in [0, 1), got {dropout!r}"
        )
    if norm not in NORMS:
        raise ConfigError(f"norm (--arch_kwargs) must be one of {', '.join(NORMS)}, got {norm!r}")
    if upsample not in UPSAMPLES:
        raise ConfigError(
            f"upsample (--arch_kwargs) must be one of {', '.join(UPSAMPLES)}, got {upsample!r}"
        )


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups that divides ``channels`` (GroupNorm needs one)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer over ``channels`` feature maps: "batch", "group" or "instance"."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


class ConvBlock(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2: [B, in_channels, H, W] -> [B, out_channels, H, W].

    With ``dropout > 0`` a channel dropout (Dropout2d) sits between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, *, norm: str, dropout: float = 0.0):
        layers = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class UpSample(nn.Module):
    """Doubles H and W and maps channels: [B, in_channels, h, w] -> [B, out_channels, 2h, 2w].

    "transpose": a learned 2x2 transposed convolution with stride 2 (the original U-Net's
    up-convolution); "bilinear": bilinear interpolation followed by a 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, *, mode: str = "transpose"):
        super().__init__()
        if mode == "transpose":
            self.layers = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        elif mode == "bilinear":
            self.layers = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            raise ConfigError(f"upsample must be one of {', '.join(UPSAMPLES)}, got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, "Attention U-Net", eq. 1-2).

    Inputs: the skip features ``x`` [B, skip_channels, H, W] and the gating signal ``g``
    [B, gate_channels, H/2, W/2] taken from the next coarser level. ``x`` is brought onto the
    gating grid by a strided 2x2 convolution (W_x), added to a 1x1 projection of ``g`` (W_g),
    passed through ReLU, a 1x1 convolution to one channel (psi) and a sigmoid; the coefficients
    alpha [B, 1, H/2, W/2] are resampled bilinearly to H, W and scale ``x``. A 1x1 conv + norm
    follows, as in the authors' grid-attention block.

    Returns the gated skip features [B, skip_channels, H, W].
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int, *, norm: str):
        super().__init__()
        self.theta_x = nn.Conv2d(skip_channels, inter_channels, 2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)
        self.project = nn.Sequential(
            nn.Conv2d(skip_channels, skip_channels, 1, bias=False), make_norm(norm, skip_channels)
        )

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients alpha in (0, 1): [B, 1, H, W] on the skip's grid."""
        q = F.relu(self.theta_x(x) + self.phi_g(g))
        alpha = torch.sigmoid(self.psi(q))
        return F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.project(x * self.attention(x, g))


class _SizeAgnosticNet(nn.Module):
    """Base class: pads the input to a multiple of ``2 ** depth`` and crops the logits back.

    Subclasses take the same keyword arguments (``in_channels, num_classes, base_channels=32,
    depth=4, dropout=0.0, norm="batch", upsample="transpose"``) and implement
    ``forward_padded(x)`` for an input whose H and W are multiples of ``2 ** depth``.
    """

    def __init__(self, *, in_channels: int, num_classes: int, base_channels: int = 32,
                 depth: int = 4, dropout: float = 0.0, norm: str = "batch",
                 upsample: str = "transpose"):
        super().__init__()
        check_unet_options(base_channels=base_channels, depth=depth, dropout=dropout, norm=norm,
                           upsample=upsample)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.widths = [base_channels * 2**i for i in range(depth + 1)]
        # What the subclasses' blocks are built with.
        self.dropout, self.norm, self.upsample = dropout, norm, upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch [B, in_channels, H, W] -> logits [B, num_classes, H, W], any H, W >= 1."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input [B, {self.in_channels}, H, W], "
                f"got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            # Replicated edges rather than zeros: normalised MR intensities need not be 0 at the
            # border, and a constant frame would be an artificial edge for the first convolutions.
            x = F.pad(x, (left, pad_w - left, top, pad_h - top), mode="replicate")
        logits = self.forward_padded(x)
        return logits[..., top:top + height, left:left + width]

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UNet(_SizeAgnosticNet):
    """Classic U-Net (Ronneberger et al. 2015) with padded convolutions and normalisation.

    Encoder: ConvBlock at level 0, then (2x2 max-pool -> ConvBlock) for levels 1..depth.
    Decoder: for levels depth-1..0, UpSample the coarser features, concatenate the skip
    features of that level, ConvBlock. Head: 1x1 conv to ``num_classes`` logits.

    forward(x [B, in_channels, H, W]) -> logits [B, num_classes, H, W].
    """

    def __init__(self, **options):
        super().__init__(**options)
        w, depth, norm, dropout, upsample = self.widths, self.depth, self.norm, self.dropout, self.upsample
        self.pool = nn.MaxPool2d(2)
        self.encoder = nn.ModuleList(
            [ConvBlock(self.in_channels, w[0], norm=norm, dropout=dropout)]
            + [ConvBlock(w[i - 1], w[i], norm=norm, dropout=dropout) for i in range(1, depth + 1)]
        )
        # decoder[i] and ups[i] produce level i (i = 0 .. depth-1).
        self.ups = nn.ModuleList([UpSample(w[i + 1], w[i], mode=upsample) for i in range(depth)])
        self.decoder = nn.ModuleList(
            [ConvBlock(2 * w[i], w[i], norm=norm, dropout=dropout) for i in range(depth)]
        )
        self.head = nn.Conv2d(w[0], self.num_classes, 1)

    def encode(self, x: torch.Tensor) -> list:
        """Features per level: [B, widths[i], H / 2**i, W / 2**i] for i = 0 .. depth."""
        skips = [self.encoder[0](x)]
        for block in self.encoder[1:]:
            skips.append(block(self.pool(skips[-1])))
        return skips

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encode(x)
        h = skips[-1]
        for i in reversed(range(self.depth)):
            h = self.decoder[i](torch.cat([skips[i], self.ups[i](h)], dim=1))
        return self.head(h)


class AttentionUNet(UNet):
    """U-Net whose skip connections pass through attention gates (Oktay et al. 2018).

    At decoder level i the skip features of level i are gated by the decoder features of level
    i+1 (the bottleneck for the deepest level) before the concatenation; see AttentionGate.

    forward(x [B, in_channels, H, W]) -> logits [B, num_classes, H, W].
    """

    def __init__(self, **options):
        super().__init__(**options)
        w, depth, norm = self.widths, self.depth, self.norm
        self.gates = nn.ModuleList(
            [AttentionGate(w[i], w[i + 1], max(w[i] // 2, 1), norm=norm) for i in range(depth)]
        )

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encode(x)
        h = skips[-1]
        for i in reversed(range(self.depth)):
            gated = self.gates[i](skips[i], h)
            h = self.decoder[i](torch.cat([gated, self.ups[i](h)], dim=1))
        return self.head(h)


class UNetPlusPlus(_SizeAgnosticNet):
    """Nested U-Net, UNet++ (Zhou et al. 2018), without deep supervision.

    Node X[i][j] sits at level i (resolution H / 2**i, widths[i] channels) and column j:
    X[i][0] is the encoder; for j >= 1, X[i][j] = ConvBlock(cat(X[i][0], ..., X[i][j-1],
    Up(X[i+1][j-1]))), the dense skip pathway. The logits come from a 1x1 conv on X[0][depth].

    forward(x [B, in_channels, H, W]) -> logits [B, num_classes, H, W].
    """

    def __init__(self, **options):
        super().__init__(**options)
        w, depth, norm, dropout, upsample = self.widths, self.depth, self.norm, self.dropout, self.upsample
        self.pool = nn.MaxPool2d(2)
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i in range(depth + 1):
            in_ch = self.in_channels if i == 0 else w[i - 1]
            self.nodes[f"x{i}_0"] = ConvBlock(in_ch, w[i], norm=norm, dropout=dropout)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.ups[f"x{i + 1}_{j - 1}"] = UpSample(w[i + 1], w[i], mode=upsample)
                self.nodes[f"x{i}_{j}"] = ConvBlock((j + 1) * w[i], w[i], norm=norm,
                                                    dropout=dropout)
        self.head = nn.Conv2d(w[0], self.num_classes, 1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        grid = [[None] * (self.depth + 1) for _ in range(self.depth + 1)]
        grid[0][0] = self.nodes["x0_0"](x)
        # Each new encoder level i completes the anti-diagonal of nodes X[i-j][j] that need it.
        for i in range(1, self.depth + 1):
            grid[i][0] = self.nodes[f"x{i}_0"](self.pool(grid[i - 1][0]))
            for j in range(1, i + 1):
                level = i - j
                up = self.ups[f"x{level + 1}_{j - 1}"](grid[level + 1][j - 1])
                grid[level][j] = self.nodes[f"x{level}_{j}"](
                    torch.cat(grid[level][:j] + [up], dim=1)
                )
        return self.head(grid[0][self.depth])
