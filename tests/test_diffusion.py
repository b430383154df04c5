"""Diffusion invariants: schedules, forward process, posterior, samplers and training loss."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.errors import ConfigError
from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    build_model_input,
    get_named_beta_schedule,
)
from guided_diffusion.mask_space import MASK_SPACES, to_diffusion_space, to_probability
from guided_diffusion.respace import full_chain_timesteps, truncated_timesteps

IMAGE_CHANNELS = 2


def make_diffusion(steps=50, schedule="linear", **kwargs):
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, steps), **kwargs)


class OracleEps(torch.nn.Module):
    """Knows x0 and returns the exact eps of the x_t it is given.

    It reads x_t from the last M input channels and undoes the diffusion's timestep scaling,
    so it checks the model-call convention too. With ``v`` set it appends a constant
    variance channel per mask channel (learn_sigma models).
    """

    def __init__(self, diffusion, x0, v=None):
        super().__init__()
        self.diffusion = diffusion
        self.x0 = x0
        self.v = v
        self.calls = 0
        self.levels = []

    def forward(self, inp, ts):
        self.calls += 1
        x_t = inp[:, -self.x0.shape[1]:]
        if self.diffusion.rescale_timesteps:
            t = torch.round(ts * self.diffusion.num_timesteps / 1000.0).long()
        else:
            t = ts.long()
        self.levels.append(int(t[0]))
        abar = torch.as_tensor(self.diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
        eps = (x_t.double() - abar.sqrt() * self.x0.double()) / (1.0 - abar).sqrt()
        eps = eps.to(x_t.dtype)
        if self.v is not None:
            eps = torch.cat([eps, torch.full_like(eps, self.v)], dim=1)
        return eps


class TinyNet(torch.nn.Module):
    """A trainable stand-in for the UNet: one conv, timesteps accepted and ignored."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x, timesteps):
        return self.conv(x)


def binary_x0(batch, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return to_diffusion_space(mask, "pm1")


# ---------------------------------------------------------------- schedules


def test_linear_schedule_endpoints_and_scaling():
    full = get_named_beta_schedule("linear", 1000)
    assert full.dtype == np.float64 and full.shape == (1000,)
    assert full[0] == pytest.approx(1e-4) and full[-1] == pytest.approx(0.02)
    short = get_named_beta_schedule("linear", 100)
    # improved-diffusion scales both ends by 1000 / N.
    assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)
    np.testing.assert_allclose(np.diff(short), (0.2 - 1e-3) / 99, rtol=1e-9)


def test_cosine_schedule_matches_closed_form():
    n = 50
    betas = get_named_beta_schedule("cosine", n)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    closed = np.array([f((i + 1) / n) / f(0.0) for i in range(n)])
    clipped = betas >= 0.999
    # Only the last step hits the 0.999 cap (alpha_bar(1) = 0); every other level is exact.
    assert clipped[-1] and not clipped[:-1].any()
    assert betas.max() == pytest.approx(0.999)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(abar[:-1], closed[:-1], rtol=1e-12)
    assert abar[-1] == pytest.approx(abar[-2] * 0.001)


def test_schedule_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--noise_schedule"):
        get_named_beta_schedule("sigmoid", 10)
    with pytest.raises(ConfigError, match="--diffusion_steps"):
        get_named_beta_schedule("linear", 0)
    # The scaled linear schedule's last beta 0.02 * 1000 / N reaches 1 at N = 20.
    with pytest.raises(ConfigError, match="--diffusion_steps > 20"):
        get_named_beta_schedule("linear", 20)
    assert get_named_beta_schedule("cosine", 5).max() < 1


# ---------------------------------------------------------------- mask space and input


@pytest.mark.parametrize("space", MASK_SPACES)
def test_mask_space_round_trip(space):
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    x = to_diffusion_space(mask, space)
    expected = {"pm1": mask * 2 - 1, "01": mask}[space]
    assert torch.equal(x, expected)
    assert torch.equal(to_probability(x, space), mask)
    assert to_probability(x + 5.0, space).max() == 1.0


def test_mask_space_unknown_is_config_error():
    with pytest.raises(ConfigError, match="--mask_space"):
        to_diffusion_space(torch.zeros(2), "pm2")
    with pytest.raises(ConfigError, match="--mask_space"):
        to_probability(torch.zeros(2), "")


def test_build_model_input_puts_image_first():
    image = torch.full((2, 3, 4, 4), 7.0)
    x_t = torch.full((2, 1, 4, 4), -1.0)
    inp = build_model_input(image, x_t)
    assert inp.shape == (2, 4, 4, 4)
    assert torch.equal(inp[:, :3], image) and torch.equal(inp[:, 3:], x_t)


# ---------------------------------------------------------------- forward process


@pytest.mark.parametrize("level", [0, 23, 49])
def test_q_sample_mean_and_variance(level):
    d = make_diffusion(50)
    n = 20000
    x0 = torch.tensor([-1.0, 0.25, 1.0]).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    t = torch.full((n,), level, dtype=torch.long)
    g = torch.Generator().manual_seed(level)
    x_t = d.q_sample(x0, t, generator=g).double()
    abar = d.alphas_cumprod[level]
    var = 1.0 - abar
    mean_tol = 4 * math.sqrt(var / n)
    var_tol = 4 * var * math.sqrt(2.0 / n)
    np.testing.assert_allclose(x_t.mean(0).flatten().numpy(), math.sqrt(abar) * x0[0].flatten().numpy(), atol=mean_tol)
    np.testing.assert_allclose(x_t.var(0).flatten().numpy(), var, atol=var_tol)


def test_q_sample_with_given_noise_is_closed_form():
    d = make_diffusion(30, "cosine")
    x0 = torch.randn(4, 1, 3, 3)
    noise = torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 5, 12, 19])
    out = d.q_sample(x0, t, noise=noise)
    abar = torch.as_tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


# ---------------------------------------------------------------- posterior


def numerical_posterior(abar_t, abar_s, x0, x_t):
    """Mean and variance of p(x_s | x0) p(x_t | x_s), normalised on a fine grid."""
    alpha_ts = abar_t / abar_s
    beta_ts = 1.0 - alpha_ts
    prior_mean, prior_var = math.sqrt(abar_s) * x0, 1.0 - abar_s
    center = x_t / math.sqrt(alpha_ts)
    width = 12 * math.sqrt(min(prior_var, beta_ts / alpha_ts))
    grid = np.linspace(center - width, center + width, 400001)
    grid = np.concatenate([grid, np.linspace(prior_mean - width, prior_mean + width, 400001)])
    grid = np.unique(grid)
    log_p = -0.5 * (grid - prior_mean) ** 2 / prior_var - 0.5 * (x_t - math.sqrt(alpha_ts) * grid) ** 2 / beta_ts
    p = np.exp(log_p - log_p.max())
    w = np.gradient(grid)
    z = np.sum(p * w)
    mean = np.sum(grid * p * w) / z
    var = np.sum((grid - mean) ** 2 * p * w) / z
    return mean, var


@pytest.mark.parametrize("pair", [(10, 9), (1, 0), (30, 12), (49, 3)])
def test_posterior_matches_gaussian_product(pair):
    t_level, s_level = pair
    d = make_diffusion(50)
    x0 = torch.tensor([0.7, -1.0], dtype=torch.float64).view(2, 1, 1, 1)
    x_t = torch.tensor([-0.3, 0.4], dtype=torch.float64).view(2, 1, 1, 1)
    t = torch.full((2,), t_level, dtype=torch.long)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t, t_prev=s_level)
    abar_t, abar_s = d.alphas_cumprod[t_level], d.alphas_cumprod[s_level]
    for i in range(2):
        ref_mean, ref_var = numerical_posterior(abar_t, abar_s, float(x0[i]), float(x_t[i]))
        assert float(mean[i]) == pytest.approx(ref_mean, rel=1e-6, abs=1e-9)
        assert float(var[i]) == pytest.approx(ref_var, rel=1e-5)
    torch.testing.assert_close(log_var, var.log())


def test_adjacent_posterior_equals_improved_diffusion_arrays():
    d = make_diffusion(30, "cosine")
    x0 = torch.randn(30, 1, 2, 2, dtype=torch.float64)
    x_t = torch.randn(30, 1, 2, 2, dtype=torch.float64)
    t = torch.arange(30)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    c1 = torch.as_tensor(d.posterior_mean_coef1).view(-1, 1, 1, 1)
    c2 = torch.as_tensor(d.posterior_mean_coef2).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * x_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var.flatten(), torch.as_tensor(d.posterior_variance), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(log_var.flatten(), torch.as_tensor(d.posterior_log_variance_clipped), rtol=1e-9, atol=1e-12)


def test_posterior_to_clean_level_is_x0():
    d = make_diffusion(30)
    x0 = torch.randn(3, 1, 2, 2)
    x_t = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 7, 19])
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t, t_prev=-1)
    torch.testing.assert_close(mean, x0)
    assert torch.equal(var, torch.zeros_like(var))
    assert torch.isfinite(log_var).all()


@pytest.mark.parametrize("kind", ["large", "small", "learned_min", "learned_max"])
def test_model_variance_for_a_pair(kind):
    learn = kind.startswith("learned")
    v = {"learned_min": -1.0, "learned_max": 1.0}.get(kind)
    d = make_diffusion(40, learn_sigma=learn, sigma_small=(kind == "small"))
    x0 = binary_x0(2, size=4)
    model = OracleEps(d, x0, v=v)
    image = torch.zeros(2, IMAGE_CHANNELS, 4, 4)
    x_t = torch.randn(2, 1, 4, 4)
    t = torch.tensor([25, 25])
    out = d.p_mean_variance(model, image, x_t, t, t_prev=10)
    abar_t, abar_s = d.alphas_cumprod[25], d.alphas_cumprod[10]
    beta_ts = 1 - abar_t / abar_s
    post = beta_ts * (1 - abar_s) / (1 - abar_t)
    expected = {"large": beta_ts, "small": post, "learned_min": post, "learned_max": beta_ts}[kind]
    torch.testing.assert_close(out["variance"], torch.full_like(x_t, expected), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["log_variance"], torch.full_like(x_t, math.log(expected)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=1e-4, rtol=0)
    assert set(out) == {"mean", "variance", "log_variance", "pred_xstart", "eps"}


def test_fixed_large_final_step_uses_finite_variance():
    d = make_diffusion(40)
    x0 = binary_x0(1, size=4)
    out = d.p_mean_variance(OracleEps(d, x0), torch.zeros(1, 2, 4, 4), torch.randn(1, 1, 4, 4), torch.tensor([0]))
    assert float(out["variance"][0, 0, 0, 0]) == pytest.approx(d.posterior_variance[1])
    torch.testing.assert_close(out["mean"], x0, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- samplers with an oracle


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"rescale_timesteps": True},
        {"sigma_small": True},
        {"learn_sigma": True, "rescale_timesteps": True},
    ],
)
def test_ddpm_full_chain_recovers_x0(flags):
    d = make_diffusion(50, **flags)
    x0 = binary_x0(2)
    model = OracleEps(d, x0, v=0.3 if flags.get("learn_sigma") else None)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    levels = full_chain_timesteps(50)
    out = d.sample_loop(model, torch.randn(2, IMAGE_CHANNELS, 8, 8), noise, levels, generator=g)
    assert model.calls == 50 and model.levels == list(range(49, -1, -1))
    torch.testing.assert_close(out["sample"], x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_k_recovers_x0(eta):
    d = make_diffusion(100, "cosine", rescale_timesteps=True)
    x0 = binary_x0(2)
    model = OracleEps(d, x0)
    g = torch.Generator().manual_seed(2)
    levels = full_chain_timesteps(100, "ddim10")
    assert levels == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0, -1]
    out = d.sample_loop(
        model, torch.zeros(2, IMAGE_CHANNELS, 8, 8), torch.randn(2, 1, 8, 8, generator=g), levels,
        method="ddim", eta=eta, generator=g,
    )
    assert model.calls == 10
    torch.testing.assert_close(out["sample"], x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "method,eta,num_steps,variance",
    [
        ("ddpm", 0.0, None, "small"),
        ("ddpm", 0.0, 5, "small"),
        ("ddpm", 0.0, 7, "learned"),
        ("ddim", 0.0, None, "large"),
        ("ddim", 0.5, 4, "large"),
    ],
)
def test_truncated_segment_ends_distributed_as_q_sample_at_T(method, eta, num_steps, variance):
    # An exact x0 keeps the marginals q(x_s | x0) only with the true posterior variance
    # (sigma_small, or a learned v = -1); DDIM keeps them for every eta.
    learned = variance == "learned"
    d = make_diffusion(50, sigma_small=variance == "small", learn_sigma=learned)
    pre_t, T = 34, 12
    n = 20000
    x0_one = torch.tensor([-1.0, 1.0, 1.0, -1.0]).view(1, 1, 2, 2)
    x0 = x0_one.expand(n, 1, 2, 2)
    model = OracleEps(d, x0, v=-1.0 if learned else None)
    g = torch.Generator().manual_seed(3)
    x_pre = d.q_sample(x0, torch.full((n,), pre_t), generator=g)
    levels = truncated_timesteps(pre_t, T, num_steps)
    out = d.sample_loop(
        model, torch.zeros(n, 1, 2, 2), x_pre, levels, method=method, eta=eta, generator=g
    )
    assert model.calls == len(levels) - 1 == (num_steps or pre_t - T)
    assert model.levels[-1] == levels[-2]
    x_T = out["sample"].double()
    abar = d.alphas_cumprod[T]
    var = 1.0 - abar
    np.testing.assert_allclose(
        x_T.mean(0).flatten().numpy(), math.sqrt(abar) * x0_one.flatten().numpy(), atol=4 * math.sqrt(var / n)
    )
    np.testing.assert_allclose(x_T.var(0).flatten().numpy(), var, atol=4 * var * math.sqrt(2.0 / n))


def test_sample_loop_is_reproducible_and_gradient_free():
    d = make_diffusion(30, learn_sigma=True)
    model = TinyNet(IMAGE_CHANNELS + 1, 2)
    image = torch.randn(2, IMAGE_CHANNELS, 8, 8)
    start = torch.randn(2, 1, 8, 8)
    levels = truncated_timesteps(15, 5, 4)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        runs.append(d.sample_loop(model, image, start, levels, generator=g, progress=True))
    assert torch.equal(runs[0]["sample"], runs[1]["sample"])
    assert not runs[0]["sample"].requires_grad
    assert runs[0]["sample"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "levels", [[5, 7, -1], [30, 3], [4, 4, 2], [3, -2], [6]]
)
def test_sample_loop_rejects_bad_levels(levels):
    d = make_diffusion(30)
    model = TinyNet(2, 1)
    with pytest.raises(ConfigError, match="timesteps"):
        d.sample_loop(model, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), levels)


def test_sample_loop_rejects_unknown_method():
    d = make_diffusion(30)
    with pytest.raises(ConfigError, match="method"):
        d.sample_loop(TinyNet(2, 1), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), [3, 2], method="plms")


# ---------------------------------------------------------------- training loss


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_training_losses_shapes_and_terms(learn_sigma):
    d = make_diffusion(30, learn_sigma=learn_sigma, rescale_learned_sigmas=True)
    model = TinyNet(IMAGE_CHANNELS + 1, 2 if learn_sigma else 1)
    x0 = binary_x0(4)
    t = torch.tensor([0, 3, 11, 19])
    terms = d.training_losses(model, torch.randn(4, IMAGE_CHANNELS, 8, 8), x0, t)
    assert set(terms) == ({"loss", "mse", "vb"} if learn_sigma else {"loss", "mse"})
    for value in terms.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    if learn_sigma:
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
        assert (terms["vb"] > 0).all()
    terms["loss"].mean().backward()
    assert model.conv.weight.grad is not None and torch.isfinite(model.conv.weight.grad).all()


def test_oracle_training_loss_is_zero():
    d = make_diffusion(30, learn_sigma=True, rescale_timesteps=True)
    x0 = binary_x0(6)
    t = torch.tensor([0, 1, 3, 6, 9, 12])
    noise = torch.randn(6, 1, 8, 8)
    terms = d.training_losses(OracleEps(d, x0, v=-1.0), torch.zeros(6, IMAGE_CHANNELS, 8, 8), x0, t, noise=noise)
    assert terms["mse"].max() < 1e-8
    # Exact x0 and the posterior's own variance (v = -1): the KL term vanishes for t > 0.
    assert terms["vb"][1:].abs().max() < 1e-6
    assert torch.isfinite(terms["vb"][0]) and terms["vb"][0] >= 0
    wrong_var = d.training_losses(OracleEps(d, x0, v=1.0), torch.zeros(6, IMAGE_CHANNELS, 8, 8), x0, t, noise=noise)
    assert (wrong_var["vb"][1:] > 1e-3).all()
    torch.testing.assert_close(wrong_var["mse"], terms["mse"])


def test_vb_rescaling_and_frozen_eps():
    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.eps_scale = torch.nn.Parameter(torch.tensor(0.5))
            self.v_value = torch.nn.Parameter(torch.tensor(0.2))

        def forward(self, inp, ts):
            x_t = inp[:, -1:]
            return torch.cat([self.eps_scale * x_t, self.v_value * torch.ones_like(x_t)], dim=1)

    x0 = binary_x0(3)
    t = torch.tensor([2, 9, 17])
    noise = torch.randn(3, 1, 8, 8)
    image = torch.zeros(3, IMAGE_CHANNELS, 8, 8)
    plain = make_diffusion(40, learn_sigma=True)
    rescaled = make_diffusion(40, learn_sigma=True, rescale_learned_sigmas=True)
    model = Split()
    vb = plain.training_losses(model, image, x0, t, noise=noise)["vb"]
    vb_rescaled = rescaled.training_losses(model, image, x0, t, noise=noise)["vb"]
    torch.testing.assert_close(vb_rescaled, vb * 40 / 1000)
    vb.sum().backward()
    # The vb term trains only the variance channels.
    assert model.eps_scale.grad is None or model.eps_scale.grad == 0
    assert model.v_value.grad is not None and model.v_value.grad != 0


def test_channel_mismatch_is_config_error():
    d = make_diffusion(30, learn_sigma=True)
    model = TinyNet(IMAGE_CHANNELS + 1, 1)
    with pytest.raises(ConfigError, match="--learn_sigma"):
        d.training_losses(model, torch.zeros(1, IMAGE_CHANNELS, 4, 4), torch.zeros(1, 1, 4, 4), torch.tensor([3]))


# ---------------------------------------------------------------- predict_xstart and pre-seg-aware targets


class OracleX0(torch.nn.Module):
    """An x0-predicting model that knows x0 (and a constant v per channel for learn_sigma)."""

    def __init__(self, x0, v=None):
        super().__init__()
        self.x0 = x0
        self.v = v

    def forward(self, inp, ts):
        out = self.x0.to(inp.dtype).expand(inp.shape[0], -1, -1, -1)
        if self.v is not None:
            out = torch.cat([out, torch.full_like(out, self.v)], dim=1)
        return out


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_x0_model_recovers_x0_and_gives_the_eps_models_steps(method, eta):
    d_eps = make_diffusion(60, "cosine")
    d_x0 = make_diffusion(60, "cosine", predict_xstart=True)
    x0 = binary_x0(2)
    image = torch.randn(2, IMAGE_CHANNELS, 8, 8)
    start = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    levels = [40, 30, 20, 10, -1]
    outs = [
        d.sample_loop(m, image, start, levels, method=method, eta=eta, generator=torch.Generator().manual_seed(4))
        for d, m in ((d_eps, OracleEps(d_eps, x0)), (d_x0, OracleX0(x0)))
    ]
    torch.testing.assert_close(outs[1]["sample"], x0, atol=1e-5, rtol=0)
    # The same exact x0, so the same reverse steps as the exact eps model.
    torch.testing.assert_close(outs[0]["sample"], outs[1]["sample"], atol=1e-5, rtol=0)


def test_x0_model_mean_and_eps_are_the_eps_models():
    d_eps, d_x0 = make_diffusion(50), make_diffusion(50, predict_xstart=True)
    x0, image = binary_x0(3), torch.zeros(3, IMAGE_CHANNELS, 8, 8)
    t = torch.tensor([3, 17, 40])
    x_t = d_eps.q_sample(x0, t, noise=torch.randn(3, 1, 8, 8))
    a = d_eps.p_mean_variance(OracleEps(d_eps, x0), image, x_t, t)
    b = d_x0.p_mean_variance(OracleX0(x0), image, x_t, t)
    for key in ("mean", "pred_xstart", "eps", "variance"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_preseg_noised_targets_make_the_x0_estimate_the_label(predict_xstart):
    """x_t is noised from another mask (the pre-segmentation): the target still points at the label."""
    d = make_diffusion(100, "cosine", predict_xstart=predict_xstart)
    # float64: at t = 99 the x0 estimate divides by sqrt(abar) ~ 1e-2.
    label, preseg = binary_x0(4, seed=0).double(), binary_x0(4, seed=1).double()
    t = torch.tensor([0, 25, 60, 99])
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_t = d.q_sample(preseg, t, noise=noise)

    class Recorder(torch.nn.Module):
        def forward(self, inp, ts):
            self.x_t = inp[:, -1:].clone()
            return torch.zeros_like(self.x_t)

    recorder = Recorder()
    image = torch.zeros(4, IMAGE_CHANNELS, 8, 8, dtype=torch.float64)
    terms = d.training_losses(recorder, image, label, t, noise=noise, noised_start=preseg)
    torch.testing.assert_close(recorder.x_t, x_t)  # noised from the pre-segmentation
    target = d._training_target(label, x_t, t, noise, preseg)
    # The model that outputs exactly the target has zero loss, and its x0 estimate is the label.
    class Exact(torch.nn.Module):
        def forward(self, inp, ts):
            return target

    exact = d.training_losses(Exact(), image, label, t, noise=noise, noised_start=preseg)
    assert exact["mse"].max() < 1e-10 and (terms["mse"] > 0).all()
    pred = d.p_mean_variance(Exact(), image, x_t, t, clip_denoised=False)
    torch.testing.assert_close(pred["pred_xstart"], label, atol=1e-9, rtol=0)
    if predict_xstart:
        torch.testing.assert_close(target, label)
    # Without a pre-segmentation the eps target is the noise, as before.
    assert torch.equal(d._training_target(label, x_t, t, noise, None), label if predict_xstart else noise)
