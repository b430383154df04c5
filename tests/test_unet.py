"""UNet: shapes, flags, errors, and compatibility with improved-/guided-diffusion's UNetModel."""

import math

import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.errors import ConfigError
from guided_diffusion.nn import GroupNorm32, normalization, timestep_embedding
from guided_diffusion.unet import (
    AttentionBlock,
    ResBlock,
    UNetModel,
    check_image_size,
    default_channel_mult,
    parse_attention_resolutions,
    parse_channel_mult,
)


def make_model(**overrides) -> UNetModel:
    flags = dict(
        image_size=16,
        in_channels=3,
        model_channels=8,
        out_channels=1,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2, 2),
        num_heads=1,
    )
    flags.update(overrides)
    return UNetModel(**flags)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values so zero-initialised convs do not hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def run(model: UNetModel, size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, size, size, generator=gen)
    t = torch.tensor([3.0, 997.5][:batch])
    return model(x, t)


# ---------------------------------------------------------------- shapes over sizes and flags


@pytest.mark.parametrize(
    "size, mult",
    [(16, (1, 2, 2)), (24, (1, 2, 2)), (32, (1, 2, 2, 2)), (48, (1, 2, 2, 2)), (64, (1, 2, 2, 2))],
)
def test_output_shape_over_image_sizes(size, mult):
    model = randomize_(make_model(image_size=size, channel_mult=mult, attention_resolutions=(4,)))
    out = run(model, size)
    assert out.shape == (2, 1, size, size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "flags",
    [
        dict(use_scale_shift_norm=True),
        dict(use_scale_shift_norm=False, attention_resolutions=()),
        dict(attention_resolutions=(1, 2, 4), num_heads=2),
        dict(num_head_channels=4),
        dict(num_heads=2, num_heads_upsample=4),
        dict(resblock_updown=True, use_scale_shift_norm=True),
        dict(conv_resample=False),
        dict(use_new_attention_order=True, num_heads=2),
        dict(dropout=0.3),
        dict(num_res_blocks=2, channel_mult=(1, 1.5, 2)),
    ],
)
def test_output_shape_over_flags(flags):
    model = randomize_(make_model(**flags))
    out = run(model, 16)
    assert out.shape == (2, 1, 16, 16)
    assert torch.isfinite(out).all()


def test_learn_sigma_doubles_output_channels():
    model = make_model(in_channels=5, out_channels=2)
    assert run(model, 16).shape == (2, 2, 16, 16)


def test_scalar_timestep_is_used_for_the_whole_batch():
    model = randomize_(make_model()).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x, torch.tensor(5.0)), model(x, torch.tensor([5.0, 5.0])))


def test_checkpointing_gives_the_same_gradients():
    plain = randomize_(make_model(use_scale_shift_norm=True, resblock_updown=True))
    ckpt = make_model(use_scale_shift_norm=True, resblock_updown=True, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    plain(x, t).square().mean().backward()
    ckpt(x, t).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_checkpointing_with_dropout_backpropagates():
    model = randomize_(make_model(use_checkpoint=True, dropout=0.5)).train()
    out = run(model, 16)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_acts_in_train_mode_only():
    model = randomize_(make_model(dropout=0.5))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([7])
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


def test_fresh_model_outputs_zeros():
    model = make_model(use_scale_shift_norm=True, resblock_updown=True)
    out = run(model, 16)
    assert torch.count_nonzero(out) == 0


# ---------------------------------------------------------------- image size and flag parsing


def test_image_size_the_unet_cannot_take():
    with pytest.raises(ConfigError) as err:
        make_model(image_size=250, channel_mult=(1, 1, 2, 2, 4, 4))
    assert str(err.value) == (
        "--image_size 250 cannot be taken by the UNet: it must be divisible by 32 "
        "(channel_mult (1, 1, 2, 2, 4, 4) downsamples 5 times)"
    )
    assert "\n" not in str(err.value)


def test_check_image_size_with_default_mult():
    check_image_size(240, default_channel_mult(240))  # BraTS slices: the 128 entry fits
    expected = r"divisible by 16 \(channel_mult \(1, 1, 2, 3, 4\) downsamples 4 times\)"
    with pytest.raises(ConfigError, match=expected):
        check_image_size(250, default_channel_mult(250))


def test_default_channel_mult_table():
    assert default_channel_mult(512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(32) == (1, 2, 2, 2)
    assert default_channel_mult(16) == (1, 2, 2)
    assert default_channel_mult(48) == (1, 2, 2, 2)
    assert default_channel_mult(1024) == (0.5, 1, 1, 2, 2, 4, 4)
    with pytest.raises(ConfigError, match="--image_size 8"):
        default_channel_mult(8)


def test_parse_channel_mult():
    assert parse_channel_mult("1,2,2") == (1, 2, 2)
    assert parse_channel_mult(" 0.5, 1 ,2") == (0.5, 1, 2)
    assert parse_channel_mult("", image_size=256) == (1, 1, 2, 2, 4, 4)
    for bad in ("1,x", "1,0", "1,-2", "1,,2"):
        with pytest.raises(ConfigError, match="--channel_mult"):
            parse_channel_mult(bad)


def test_parse_attention_resolutions():
    assert parse_attention_resolutions("16,8", 256) == (16, 32)
    assert parse_attention_resolutions("16", 256) == (16,)
    assert parse_attention_resolutions("", 256) == ()
    assert parse_attention_resolutions("16,8", 32) == (2, 4)
    for bad in ("16,a", "0", "1.5", "512"):
        with pytest.raises(ConfigError, match="--attention_resolutions"):
            parse_attention_resolutions(bad, 256)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_heads=3), "--num_heads 3 does not divide the 16 channels"),
        (dict(num_head_channels=3), "--num_head_channels 3 does not divide"),
        (dict(num_heads=2, num_heads_upsample=3), "--num_heads_upsample 3"),
        (dict(dropout=1.0), "--dropout"),
        (dict(model_channels=0), "--num_channels"),
        (dict(channel_mult=()), "--channel_mult"),
    ],
)
def test_bad_flags_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        make_model(**flags)


def test_input_of_wrong_size_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 18, 18), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]))


# ---------------------------------------------------------------- state dicts


def test_state_dict_round_trip(tmp_path):
    model = randomize_(make_model(use_scale_shift_norm=True)).eval()
    path = tmp_path / "unet.pt"
    torch.save(model.state_dict(), path)
    other = make_model(use_scale_shift_norm=True).eval()
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    assert torch.equal(model(x, t), other(x, t))


def _resblock(prefix, ch_in, ch_out, emb=64, scale_shift=False):
    keys = {
        f"{prefix}.in_layers.0.weight": (ch_in,),
        f"{prefix}.in_layers.0.bias": (ch_in,),
        f"{prefix}.in_layers.2.weight": (ch_out, ch_in, 3, 3),
        f"{prefix}.in_layers.2.bias": (ch_out,),
        f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * ch_out, emb),
        f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * ch_out,),
        f"{prefix}.out_layers.0.weight": (ch_out,),
        f"{prefix}.out_layers.0.bias": (ch_out,),
        f"{prefix}.out_layers.3.weight": (ch_out, ch_out, 3, 3),
        f"{prefix}.out_layers.3.bias": (ch_out,),
    }
    if ch_in != ch_out:
        keys[f"{prefix}.skip_connection.weight"] = (ch_out, ch_in, 1, 1)
        keys[f"{prefix}.skip_connection.bias"] = (ch_out,)
    return keys


def _attention(prefix, ch):
    return {
        f"{prefix}.norm.weight": (ch,),
        f"{prefix}.norm.bias": (ch,),
        f"{prefix}.qkv.weight": (3 * ch, ch, 1),
        f"{prefix}.qkv.bias": (3 * ch,),
        f"{prefix}.proj_out.weight": (ch, ch, 1),
        f"{prefix}.proj_out.bias": (ch,),
    }


def _conv(prefix, ch_out, ch_in):
    return {f"{prefix}.weight": (ch_out, ch_in, 3, 3), f"{prefix}.bias": (ch_out,)}


def expected_keys(scale_shift=False, resblock_updown=False):
    """The state dict of guided-diffusion's UNetModel(image_size=16, in_channels=5,
    model_channels=16, out_channels=1, num_res_blocks=1, attention_resolutions=(2,),
    channel_mult=(1, 2), num_heads=1), listed block by block from its constructor.

    Encoder: conv 5->16 | Res 16->16 | Downsample 16 (ds 2) | Res 16->32 + Attn 32.
    Skip channels pushed: [16, 16, 16, 32]. Middle: Res 32, Attn 32, Res 32.
    Decoder level 1: Res 32+32->32 + Attn | Res 32+16->32 + Attn + Upsample 32.
    Decoder level 0: Res 32+16->16 | Res 16+16->16. Out: GN 16, conv 16->1.
    """
    ss = scale_shift
    keys = {
        "time_embed.0.weight": (64, 16),
        "time_embed.0.bias": (64,),
        "time_embed.2.weight": (64, 64),
        "time_embed.2.bias": (64,),
        **_conv("input_blocks.0.0", 16, 5),
        **_resblock("input_blocks.1.0", 16, 16, scale_shift=ss),
        **(
            _resblock("input_blocks.2.0", 16, 16, scale_shift=ss)
            if resblock_updown
            else _conv("input_blocks.2.0.op", 16, 16)
        ),
        **_resblock("input_blocks.3.0", 16, 32, scale_shift=ss),
        **_attention("input_blocks.3.1", 32),
        **_resblock("middle_block.0", 32, 32, scale_shift=ss),
        **_attention("middle_block.1", 32),
        **_resblock("middle_block.2", 32, 32, scale_shift=ss),
        **_resblock("output_blocks.0.0", 64, 32, scale_shift=ss),
        **_attention("output_blocks.0.1", 32),
        **_resblock("output_blocks.1.0", 48, 32, scale_shift=ss),
        **_attention("output_blocks.1.1", 32),
        **(
            _resblock("output_blocks.1.2", 32, 32, scale_shift=ss)
            if resblock_updown
            else _conv("output_blocks.1.2.conv", 32, 32)
        ),
        **_resblock("output_blocks.2.0", 48, 16, scale_shift=ss),
        **_resblock("output_blocks.3.0", 32, 16, scale_shift=ss),
        "out.0.weight": (16,),
        "out.0.bias": (16,),
        **_conv("out.2", 1, 16),
    }
    return keys


@pytest.mark.parametrize("scale_shift, resblock_updown", [(False, False), (True, True)])
def test_parameter_names_match_guided_diffusion(scale_shift, resblock_updown):
    model = UNetModel(
        image_size=16,
        in_channels=5,
        model_channels=16,
        out_channels=1,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_heads=1,
        use_scale_shift_norm=scale_shift,
        resblock_updown=resblock_updown,
    )
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_keys(scale_shift, resblock_updown)
    assert sorted(set(got) - set(want)) == []
    assert sorted(set(want) - set(got)) == []
    assert got == want
    # The key order is the constructor's order, as in guided-diffusion.
    assert list(got)[:5] == [
        "time_embed.0.weight",
        "time_embed.0.bias",
        "time_embed.2.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
    ]


# ---------------------------------------------------------------- blocks against hand-written references


def _reference_attention(block, x, heads, legacy):
    """improved-diffusion's attention, written out with einsum (legacy: heads split first)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    normed = F.group_norm(flat, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = F.conv1d(normed, block.qkv.weight, block.qkv.bias)
    ch = c // heads
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, h * w).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(b * heads, ch, h * w) for part in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    out = F.conv1d(a, block.proj_out.weight, block.proj_out.bias)
    return (flat + out).reshape(b, c, h, w)


@pytest.mark.parametrize("legacy, heads", [(True, 1), (True, 4), (False, 4)])
def test_attention_block_matches_reference(legacy, heads):
    block = randomize_(AttentionBlock(32, num_heads=heads, use_new_attention_order=not legacy), seed=3)
    x = torch.randn(2, 32, 4, 6)
    torch.testing.assert_close(block(x), _reference_attention(block, x, heads, legacy), atol=1e-5, rtol=1e-5)


def test_attention_orders_differ():
    legacy = randomize_(AttentionBlock(32, num_heads=4), seed=3)
    new = AttentionBlock(32, num_heads=4, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict(), strict=True)
    x = torch.randn(1, 32, 4, 4)
    assert not torch.allclose(legacy(x), new(x))


def test_attention_num_head_channels_sets_heads():
    assert AttentionBlock(64, num_heads=1, num_head_channels=16).num_heads == 4


def test_resblock_scale_shift_matches_reference():
    block = randomize_(ResBlock(16, 24, 0.0, out_channels=32, use_scale_shift_norm=True), seed=4)
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    g1, c1 = block.in_layers[0], block.in_layers[2]
    h = F.conv2d(F.silu(F.group_norm(x, g1.num_groups, g1.weight, g1.bias)), c1.weight, c1.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)[:, :, None, None]
    scale, shift = e[:, :32], e[:, 32:]
    g2, c2 = block.out_layers[0], block.out_layers[3]
    h = F.group_norm(h, g2.num_groups, g2.weight, g2.bias) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), c2.weight, c2.bias, padding=1)
    skip = F.conv2d(x, block.skip_connection.weight, block.skip_connection.bias)
    torch.testing.assert_close(block(x, emb), skip + h, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 250.5])
    emb = timestep_embedding(t, 9)
    half = 4
    freqs = torch.tensor([10000 ** (-i / half) for i in range(half)])
    want = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs), torch.zeros(3, 1)], dim=1)
    assert emb.shape == (3, 9) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, want)


def test_group_norm_computes_in_float32():
    norm = normalization(64)
    assert isinstance(norm, GroupNorm32) and norm.num_groups == 32
    x = (torch.randn(1, 64, 4, 4) * 100 + 1000).half()
    out = norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), norm(x.float()), atol=2e-3, rtol=2e-3)
