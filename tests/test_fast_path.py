"""The UNet's fast path: the same function as guided-diffusion's UNet on the same weights.

Off, our UNet computes exactly the published function (the reference UNet of the benchmarks,
written from guided-diffusion's unet.py, loads the same state dict); on, it stays within float
tolerance of it; the parameters and their names never change.
"""

import copy
import warnings

import pytest
import torch
import torch._inductor.config as inductor_config

from benchmarks.reference_unet import reference_like
from guided_diffusion.fast_path import CompiledUNet, apply_fast_path, resolve_attention
from guided_diffusion.unet import UNetModel


def make_model(**overrides) -> UNetModel:
    flags = dict(
        image_size=16, in_channels=5, model_channels=32, out_channels=1, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_heads=1,
    )
    flags.update(overrides)
    model = UNetModel(**flags)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
    return model.eval()


def inputs(model: UNetModel, batch: int = 3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, 16, 16, generator=gen, dtype=dtype)
    return x, torch.tensor([3.0, 250.0, 997.5][:batch])


def assert_float_close(got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Equal up to the rounding of a different summation order: relative to the output's scale,
    since one output element near zero is the sum of large terms."""
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=tolerance * want.abs().max().item(), rtol=0)


ARCHITECTURES = [
    dict(),
    dict(use_scale_shift_norm=True, resblock_updown=True),
    dict(num_heads=4, use_new_attention_order=True, conv_resample=False),
    dict(num_res_blocks=2, num_head_channels=16, out_channels=2),
]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_path_off_is_the_published_computation(arch):
    model = make_model(**arch)
    reference = reference_like(model).eval()
    published = apply_fast_path(model, "cpu", enabled=False)
    x, t = inputs(model)
    with torch.inference_mode():
        assert torch.equal(published(x, t), reference(x, t))


@pytest.mark.parametrize("attention", ["auto", "sdpa", "einsum"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_path_on_stays_within_float_tolerance(arch, attention):
    model = make_model(**arch)
    x, t = inputs(model)
    with torch.inference_mode():
        want = reference_like(model).eval()(x, t)
        fast = apply_fast_path(model, "cpu", attention=attention, channels_last=True)
        got = fast(x, t)
    assert got.is_contiguous()
    assert_float_close(got, want)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_path_computes_the_same_function_in_float64(arch):
    # In float64 the rounding differences of the fp32 test vanish: the same function.
    model = make_model(**arch).double()
    x, t = inputs(model, dtype=torch.float64)
    with torch.inference_mode():
        want = apply_fast_path(copy.deepcopy(model), "cpu", enabled=False)(x, t)
        got = apply_fast_path(model, "cpu", attention="sdpa", channels_last=True)(x, t)
    assert_float_close(got, want, tolerance=1e-12)


def test_in_place_arithmetic_without_autograd_is_exact():
    model = make_model(use_scale_shift_norm=True, resblock_updown=True)
    x, t = inputs(model)
    with torch.no_grad():
        no_graph = model(x, t)
    assert torch.equal(no_graph, model(x, t))


def test_fast_path_keeps_parameters_and_their_names(tmp_path):
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    apply_fast_path(model, "cpu", channels_last=True)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    # A state dict saved from the NHWC model loads into a fresh NCHW one.
    path = tmp_path / "unet.pt"
    torch.save(after, path)
    fresh = make_model()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, t = inputs(model)
    with torch.inference_mode():
        assert_float_close(model(x, t), fresh(x, t))


def test_fast_path_model_still_trains():
    model = make_model().train()
    apply_fast_path(model, "cpu", channels_last=True)
    x, t = inputs(model)
    model(x, t).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_autocast_on_cpu_is_close():
    model = apply_fast_path(make_model(), "cpu")
    x, t = inputs(model)
    with torch.inference_mode():
        want = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, t)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_attention_choice():
    assert resolve_attention("auto", torch.device("cpu")) == "einsum"
    assert resolve_attention("auto", torch.device("cuda")) == "sdpa"
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        resolve_attention("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        make_model().set_attention("flash")


# A machine without a C++ compiler, as inductor sees it: compiling the UNet really fails.
NO_COMPILER = inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)})


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_without_a_compiler_falls_back_to_eager(fresh_dynamo):
    model = make_model()
    x, t = inputs(model)
    with torch.inference_mode():
        want = copy.deepcopy(model)(x, t)
    fast = apply_fast_path(model, "cpu", compile=True)
    assert isinstance(fast, CompiledUNet)
    with NO_COMPILER, torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast(x, t)
        again = fast(x, t)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch.compile of the UNet failed" in messages[0]
    assert fast.compiled is None
    assert_float_close(got, want)
    assert torch.equal(again, got)


def test_compiled_unet_raises_a_bad_input_error_eagerly(fresh_dynamo):
    fast = apply_fast_path(make_model(), "cpu", compile=True)
    with NO_COMPILER, torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"the UNet expects input \[B, 5, H, W\]"):
            fast(torch.randn(1, 4, 16, 16), torch.tensor([1.0]))


@pytest.mark.slow
def test_compiled_unet_matches_eager(fresh_dynamo):
    model = make_model()
    x, t = inputs(model)
    with torch.inference_mode():
        want = model(x, t)
        fast = apply_fast_path(model, "cpu", compile=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = fast(x, t)
    assert fast.compiled is not None
    assert_float_close(got, want)
