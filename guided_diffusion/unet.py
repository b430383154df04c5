"""The diffusion UNet: residual blocks with a timestep embedding, attention, skip connections.

The module tree and parameter names follow improved-/guided-diffusion's ``UNetModel``
(``time_embed.*``, ``input_blocks.*``, ``middle_block.*``, ``output_blocks.*``, ``out.*``), so
a raw state dict trained by that family of code with the same flags loads with
``strict=True`` and computes the same function. Only 2D images and no class conditioning.

The model knows nothing of diffusion: ``forward(x, timesteps)`` maps an input
[B, in_channels, H, W] and timesteps [B] to [B, out_channels, H, W].
"""

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.errors import ConfigError
from guided_diffusion.nn import (
    at_least_float32,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

# How attention is computed (see _attend); a module attribute, not a parameter.
ATTENTION_IMPLS = ("sdpa", "einsum")

# channel_mult by image size: guided-diffusion's table, plus improved-diffusion's 32 entry
# and a 16 entry for small experiments. Other sizes use the largest entry not above them.
CHANNEL_MULT_TABLE = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}


def default_channel_mult(image_size: int) -> tuple:
    """The channel multipliers used when ``--channel_mult`` is empty.

    The table entry for ``image_size``, or for the largest table size below it (e.g. 240 ->
    the 128 entry). Sizes below 16 have no default: ConfigError.
    """
    fitting = [size for size in CHANNEL_MULT_TABLE if size <= image_size]
    if not fitting:
        raise ConfigError(
            f"--image_size {image_size} is too small for a default --channel_mult "
            f"(the smallest default is for 16); give --channel_mult explicitly"
        )
    return CHANNEL_MULT_TABLE[max(fitting)]


def check_image_size(image_size: int, channel_mult: Iterable) -> None:
    """Raise ConfigError unless the UNet with ``channel_mult`` can take ``image_size`` images.

    Each level but the last halves the resolution, and the skip connections need every
    halving to be exact, so the size must be divisible by 2 ** (len(channel_mult) - 1).
    """
    mult = tuple(channel_mult)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"--image_size {image_size!r} must be a positive integer")
    downsamples = len(mult) - 1
    factor = 2**downsamples
    if image_size % factor:
        raise ConfigError(
            f"--image_size {image_size} cannot be taken by the UNet: it must be divisible by "
            f"{factor} (channel_mult {mult} downsamples {downsamples} times)"
        )


def _number(text: str, flag: str, whole: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag} {whole!r}: {text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{flag} {whole!r}: every entry must be a positive number, got {text!r}")
    return int(value) if value.is_integer() else value


def parse_channel_mult(s: str, image_size: int | None = None) -> tuple:
    """Parse the ``--channel_mult`` flag: "1,2,2" -> (1, 2, 2); "0.5,1,2" -> (0.5, 1, 2).

    An empty string means the default for ``image_size`` (see ``default_channel_mult``).
    """
    s = s.strip()
    if not s:
        if image_size is None:
            raise ValueError("an empty channel_mult needs image_size to pick the default")
        return default_channel_mult(image_size)
    return tuple(_number(part.strip(), "--channel_mult", s) for part in s.split(","))


def parse_attention_resolutions(s: str, image_size: int) -> tuple:
    """Parse ``--attention_resolutions`` into the downsample factors the UNet takes.

    The flag lists feature-map sizes, as improved-diffusion's does: "16,8" at image size
    256 -> (16, 32), i.e. ds = image_size // resolution. An empty string means no
    attention except the middle block's. As in improved-diffusion, a resolution that no
    level of the UNet reaches (ds not a power of two within channel_mult) adds nothing.
    """
    s = s.strip()
    if not s:
        return ()
    factors = []
    for part in s.split(","):
        value = _number(part.strip(), "--attention_resolutions", s)
        if not isinstance(value, int):
            raise ConfigError(f"--attention_resolutions {s!r}: {part.strip()!r} is not an integer")
        if value > image_size:
            raise ConfigError(
                f"--attention_resolutions {s!r}: resolution {value} is larger than --image_size {image_size}"
            )
        factors.append(image_size // value)
    return tuple(factors)


def check_attention_impl(impl: str) -> None:
    """ValueError unless ``impl`` is one of ``ATTENTION_IMPLS``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r} (choose one of {', '.join(ATTENTION_IMPLS)})")


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence of layers; those that are TimestepBlocks also receive the embedding.

    Shapes: x [B, C, H, W], emb [B, E] -> [B, C', H', W'].
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (``.conv``).

    Shapes: [B, channels, H, W] -> [B, out_channels, 2H, 2W].
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(2, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by 2x2 average pooling (``.op``).

    Shapes: [B, channels, H, W] -> [B, out_channels, H/2, W/2].
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = conv_nd(2, channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = avg_pool_nd(2, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding, optionally resampling.

    h = in_layers(x) (norm, SiLU, conv); the embedding is projected by emb_layers and either
    added to h, or (use_scale_shift_norm) applied as norm(h) * (1 + scale) + shift; then
    out_layers (norm, SiLU, dropout, zero-initialised conv); output skip_connection(x) + h.
    With up/down the block also resamples both branches by 2 (resblock_updown).

    Shapes: x [B, channels, H, W], emb [B, emb_channels] -> [B, out_channels, H', W'].
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(2, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(2, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(2, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(2, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Without autograd the fresh intermediates are updated in place: the same arithmetic
        # in fewer new buffers (on CPU every large new buffer costs page faults).
        inplace = not torch.is_grad_enabled()
        in_norm, in_conv = self.in_layers[0], self.in_layers[2]
        h = F.silu(in_norm(x), inplace=inplace)
        if self.updown:
            # Resample between the activation and the conv, as guided-diffusion does.
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        out_norm, dropout, out_conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = _add(_mul(out_norm(h), 1 + scale, inplace), shift, inplace)
        else:
            h = out_norm(_add(h, emb_out, inplace))
        h = out_conv(dropout(F.silu(h, inplace=inplace)))
        return _add(h, self.skip_connection(x), inplace)


def _add(h: torch.Tensor, other: torch.Tensor, inplace: bool) -> torch.Tensor:
    """h + other, written into h's buffer when allowed and the result has h's dtype and shape."""
    if _fits(h, other, inplace):
        return h.add_(other)
    return h + other


def _mul(h: torch.Tensor, other: torch.Tensor, inplace: bool) -> torch.Tensor:
    """h * other, written into h's buffer when allowed and the result has h's dtype and shape."""
    if _fits(h, other, inplace):
        return h.mul_(other)
    return h * other


def _fits(h: torch.Tensor, other: torch.Tensor, inplace: bool) -> bool:
    # Equal dtypes rather than torch.result_type, which torch.compile cannot trace.
    return inplace and other.dtype == h.dtype and torch.broadcast_shapes(h.shape, other.shape) == h.shape


def _heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads: ``num_heads``, or channels // num_head_channels when that is not -1."""
    if num_head_channels == -1:
        return num_heads
    return channels // num_head_channels


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention over a packed qkv tensor, heads split before q/k/v.

    The channel layout is [head][q|k|v][ch], i.e. qkv.reshape(B * heads, 3 * ch, T) is then
    split into q, k, v (improved-diffusion's order; use_new_attention_order=False).

    Shapes: qkv [B, heads * 3 * ch, T] -> [B, heads * ch, T].
    """

    def __init__(self, n_heads: int, impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(impl)
        self.n_heads = n_heads
        self.impl = impl

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, self.n_heads, 3 * ch, length).split(ch, dim=2)
        return _attend(q, k, v, self.impl).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Multi-head attention over a packed qkv tensor, q/k/v split before heads.

    The channel layout is [q|k|v][head][ch] (guided-diffusion's use_new_attention_order=True).

    Shapes: qkv [B, 3 * heads * ch, T] -> [B, heads * ch, T].
    """

    def __init__(self, n_heads: int, impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(impl)
        self.n_heads = n_heads
        self.impl = impl

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, 3, self.n_heads, ch, length).unbind(dim=1)
        return _attend(q, k, v, self.impl).reshape(bs, -1, length)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v, per batch element and head.

    ``"einsum"`` is improved-/guided-diffusion's computation: q and k each scaled by
    ch ** -1/4 (steadier in fp16 than one division afterwards), the softmax in (at least) float32.
    ``"sdpa"`` is ``scaled_dot_product_attention``: the same function, through fused kernels
    that never materialise the T x T weights where the device has them.

    Shapes: q, k, v [B, heads, ch, T] -> [B, heads, ch, T].
    """
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2)
    scale = q.shape[-2] ** -0.25
    weight = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)
    weight = torch.softmax(at_least_float32(weight), dim=-1).type(weight.dtype)
    return torch.einsum("bhts,bhcs->bhct", weight, v)


class AttentionBlock(nn.Module):
    """Self-attention between all spatial positions, with a residual connection.

    h = proj_out(attention(qkv(norm(x)))), output x + h; proj_out starts at zero so a fresh
    block is the identity.

    Shapes: [B, channels, H, W] -> [B, channels, H, W].
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = _heads_for(channels, num_heads, num_head_channels)
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {self.num_heads} attention heads")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            self.attention = QKVAttention(self.num_heads)
        else:
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = self.proj_out(self.attention(self.qkv(self.norm(x.reshape(b, c, -1)))))
        # x first: the sum keeps x's memory format (NHWC stays NHWC).
        return x + h.reshape(b, c, *spatial)


def _check_heads(channels: int, num_heads: int, num_head_channels: int, heads_flag: str) -> None:
    """ConfigError unless an attention layer of ``channels`` channels can be split as asked."""
    if num_head_channels != -1:
        if num_head_channels < 1 or channels % num_head_channels:
            raise ConfigError(
                f"--num_head_channels {num_head_channels} does not divide the {channels} channels "
                f"of an attention layer"
            )
    elif num_heads < 1 or channels % num_heads:
        raise ConfigError(
            f"{heads_flag} {num_heads} does not divide the {channels} channels of an attention layer"
        )


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding (improved-/guided-diffusion layout).

    Args:
        image_size: side of the square inputs; checked against channel_mult (ConfigError).
        in_channels: channels of the input (image channels + noisy mask channels).
        model_channels: base width (``--num_channels``).
        out_channels: output channels (mask channels, doubled with learn_sigma).
        num_res_blocks: residual blocks per level.
        attention_resolutions: downsample factors ds at which attention is used
            (see ``parse_attention_resolutions``); the middle block always attends.
        dropout: dropout probability inside the residual blocks.
        channel_mult: width multiplier per level; each level but the last halves the size.
        conv_resample: learned convolutions (True) or pooling / plain upsampling (False).
        use_checkpoint: gradient checkpointing in every block (less memory, more compute).
        num_heads: attention heads per layer (when num_head_channels is -1).
        num_head_channels: channels per head; overrides num_heads unless -1.
        num_heads_upsample: heads in the decoder's attention layers; -1 means num_heads.
        use_scale_shift_norm: FiLM-like conditioning norm(h) * (1 + scale) + shift.
        resblock_updown: resample inside residual blocks instead of Downsample/Upsample.
        use_new_attention_order: split q/k/v before heads (QKVAttention) rather than after.

    Shapes: forward(x [B, in_channels, H, W], timesteps [B]) -> [B, out_channels, H, W], with
    H and W divisible by 2 ** (len(channel_mult) - 1).
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Iterable = (1, 2, 4, 8),
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        if not channel_mult:
            raise ConfigError("--channel_mult must list at least one multiplier")
        check_image_size(image_size, channel_mult)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ConfigError(f"the UNet needs at least one {name}, got {value}")
        if model_channels < 1:
            raise ConfigError(f"--num_channels must be positive, got {model_channels}")
        if num_res_blocks < 0:
            raise ConfigError(f"--num_res_blocks must be 0 or more, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {dropout}")
        widths = [int(mult * model_channels) for mult in channel_mult]
        if min(widths) < 1:
            raise ConfigError(
                f"--channel_mult {channel_mult} with --num_channels {model_channels} gives a level "
                f"without channels"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        # NCHW by default; use_channels_last() switches weights and activations to NHWC.
        self.memory_format = torch.contiguous_format

        # Attention widths are checked up front so a bad head count names its flag.
        attention_levels = [level for level in range(len(channel_mult)) if 2**level in attention_resolutions]
        for level in attention_levels:
            _check_heads(widths[level], num_heads, num_head_channels, "--num_heads")
            _check_heads(widths[level], num_heads_upsample, num_head_channels, "--num_heads_upsample")
        _check_heads(widths[-1], num_heads, num_head_channels, "--num_heads")

        def res_block(ch_in: int, ch_out: int, **updown) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **updown,
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        ch = input_ch = widths[0]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(2, in_channels, ch, 3, padding=1))]
        )
        input_block_chans = [ch]
        ds = 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, width)]
                ch = width
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(widths) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), width)]
                ch = width
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(2, input_ch, out_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Apply the model.

        Args:
            x: [B, in_channels, H, W] input (image channels, then noisy mask channels).
            timesteps: [B] timesteps (may be fractional, e.g. rescaled to 0..1000), or a scalar
                used for the whole batch.

        Returns:
            [B, out_channels, H, W] in the dtype of ``x``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the UNet expects input [B, {self.in_channels}, H, W], got {list(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"the UNet needs H and W divisible by {factor}, got {list(x.shape[2:])}")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])

        # A model cast as a whole (model.half(), .double()) computes in its own dtype.
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        hs = []
        h = x.to(dtype).contiguous(memory_format=self.memory_format)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).to(x.dtype).contiguous()

    def set_attention(self, impl: str) -> "UNetModel":
        """Compute every attention layer with ``impl``: "sdpa" or "einsum" (see ``_attend``)."""
        check_attention_impl(impl)
        for module in self.modules():
            if isinstance(module, (QKVAttention, QKVAttentionLegacy)):
                module.impl = impl
        return self

    def use_channels_last(self, enabled: bool = True) -> "UNetModel":
        """Keep the 4D weights and the activations in NHWC (``torch.channels_last``) or in NCHW.

        oneDNN and cuDNN convolutions run NHWC without reordering their input and output on
        every call; the parameters' values and names do not change.
        """
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        return self.to(memory_format=self.memory_format)
