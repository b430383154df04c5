"""Respacing, the truncated ADDPM segment and the training timestep samplers."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.errors import ConfigError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    WindowMixture,
    create_named_schedule_sampler,
    parse_t_range,
)
from guided_diffusion.respace import (
    full_chain_timesteps,
    respaced_betas,
    space_timesteps,
    truncated_timesteps,
)


def make_diffusion(steps, schedule="linear", **kwargs):
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, steps), **kwargs)


# ---------------------------------------------------------------- space_timesteps


def test_space_timesteps_strings_as_improved_diffusion():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and min(kept) == 0 and max(kept) == 999
    # Stride (10 - 1) / 2 = 4.5, rounded the way Python's round() does.
    assert space_timesteps(10, "3") == {0, 4, 9}
    sections = space_timesteps(300, "10,10,10")
    assert len(sections) == 30
    assert {0, 99, 100, 199, 200, 299} <= sections
    assert space_timesteps(300, [10, 10, 10]) == sections
    # 100 does not split evenly: the first section gets the extra step (34, 33, 33).
    uneven = sorted(space_timesteps(100, "2,2,2"))
    assert uneven == [0, 33, 34, 66, 67, 99]
    assert space_timesteps(7, "") == set(range(7))


@pytest.mark.parametrize("spec", ["ddim40", "200", "abc", "ddimx", "5,-1"])
def test_space_timesteps_errors(spec):
    with pytest.raises(ConfigError, match="--timestep_respacing"):
        space_timesteps(100, spec)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["ddim10", "25", "5,10,3", ""])
def test_respaced_alphas_cumprod_equal_kept_entries(schedule, spec):
    d = make_diffusion(60, schedule)
    kept = sorted(space_timesteps(60, spec))
    betas = respaced_betas(d.alphas_cumprod, kept)
    assert betas.shape == (len(kept),)
    np.testing.assert_allclose(np.cumprod(1.0 - betas), d.alphas_cumprod[kept], rtol=1e-10)


def test_full_chain_timesteps():
    assert full_chain_timesteps(5) == [4, 3, 2, 1, 0, -1]
    assert full_chain_timesteps(100, "ddim10") == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0, -1]
    levels = full_chain_timesteps(100, "20")
    assert len(levels) == 21 and levels[0] == 99 and levels[-2:] == [0, -1]


# ---------------------------------------------------------------- the pair posterior is the respaced chain's


class FixedOutput(torch.nn.Module):
    """Ignores the timestep: the same eps and v for the full and the respaced view."""

    def forward(self, inp, ts):
        x_t = inp[:, -1:]
        return torch.cat([0.3 * x_t + 0.1, torch.tanh(x_t)], dim=1)


@pytest.mark.parametrize("variance", ["large", "small", "learned"])
def test_pair_step_equals_respaced_chain(variance):
    flags = {"learn_sigma": variance == "learned", "sigma_small": variance == "small"}
    full = make_diffusion(40, "cosine", **flags)
    kept = sorted(space_timesteps(40, "8"))
    spaced = GaussianDiffusion(betas=respaced_betas(full.alphas_cumprod, kept), **flags)
    model = FixedOutput() if flags["learn_sigma"] else (lambda inp, ts: 0.3 * inp[:, -1:] + 0.1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    image = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    for i in range(1, len(kept)):
        t_full = torch.full((3,), kept[i])
        t_spaced = torch.full((3,), i)
        ours = full.q_posterior_mean_variance(x0, x_t, t_full, t_prev=kept[i - 1])
        ref = spaced.q_posterior_mean_variance(x0, x_t, t_spaced)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        ours = full.p_mean_variance(model, image, x_t, t_full, t_prev=kept[i - 1])
        ref = spaced.p_mean_variance(model, image, x_t, t_spaced)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-9, atol=1e-12)
    # The step to clean: same mean (the x0 estimate) as the respaced chain's index 0.
    ours = full.p_mean_variance(model, image, x_t, torch.full((3,), kept[0]), t_prev=-1)
    ref = spaced.p_mean_variance(model, image, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(ours["mean"], ref["mean"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- truncated_timesteps


def test_truncated_timesteps_every_step():
    assert truncated_timesteps(300, 250) == list(range(300, 249, -1))
    assert truncated_timesteps(5, 0) == [5, 4, 3, 2, 1, 0]


def test_truncated_timesteps_spaced_counts_and_ends():
    assert truncated_timesteps(300, 250, 5) == [300, 290, 280, 270, 260, 250]
    assert truncated_timesteps(10, 0, 10) == list(range(10, -1, -1))
    for pre_t, T in [(300, 250), (17, 3), (999, 0), (8, 7)]:
        for k in range(1, pre_t - T + 1, max(1, (pre_t - T) // 13)):
            levels = truncated_timesteps(pre_t, T, k)
            assert len(levels) == k + 1
            assert levels[0] == pre_t and levels[-1] == T
            gaps = -np.diff(levels)
            assert (gaps >= 1).all()
            assert gaps.max() - gaps.min() <= 1


@pytest.mark.parametrize(
    "args,kwargs,flag",
    [
        ((250, 300), {}, "--pre_t"),
        ((300, 300), {}, "--pre_t"),
        ((300, -1), {}, "--T"),
        ((300, 250, 51), {}, "--sampling_steps"),
        ((300, 250, 0), {}, "--sampling_steps"),
        ((1000, 250), {"num_timesteps": 1000}, "--pre_t"),
    ],
)
def test_truncated_timesteps_errors(args, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        truncated_timesteps(*args, **kwargs)


# ---------------------------------------------------------------- samplers


def test_uniform_sampler():
    d = make_diffusion(30)
    sampler = create_named_schedule_sampler("uniform", d)
    assert isinstance(sampler, UniformSampler)
    t, w = sampler.sample(500, torch.device("cpu"))
    assert t.dtype == torch.long and t.shape == (500,) and w.shape == (500,)
    assert t.min() >= 0 and t.max() < 30
    assert torch.equal(w, torch.ones(500))
    a = sampler.sample(16, "cpu", generator=torch.Generator().manual_seed(4))[0]
    b = sampler.sample(16, "cpu", generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b)


def test_loss_second_moment_prefers_high_loss_levels():
    n = 24
    d = make_diffusion(n)
    sampler = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(sampler, LossSecondMomentResampler)
    losses_for = lambda ts: torch.where(ts >= n // 2, 10.0, 0.1)  # noqa: E731
    all_levels = torch.arange(n)
    for _ in range(9):
        sampler.update_with_local_losses(all_levels, losses_for(all_levels))
        # Not warmed up yet: uniform.
        assert np.array_equal(sampler.weights(), np.ones(n))
    sampler.update_with_local_losses(all_levels, losses_for(all_levels))
    weights = sampler.weights()
    assert weights[n // 2:].min() > 50 * weights[: n // 2].max()
    assert weights.sum() == pytest.approx(1.0)
    assert weights.min() >= 0.001 / n
    t, w = sampler.sample(4000, "cpu", generator=torch.Generator().manual_seed(0))
    assert (t >= n // 2).float().mean() > 0.95
    # Importance weights undo the non-uniform draw: 1 / (N p(t)).
    torch.testing.assert_close(w, torch.as_tensor(1.0 / (n * weights[t.numpy()]), dtype=torch.float32))


def test_loss_history_keeps_the_latest_terms():
    d = make_diffusion(2, "cosine")
    sampler = LossSecondMomentResampler(d, history_per_term=3)
    sampler.update_with_all_losses([0] * 5 + [1] * 3, [1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(sampler._loss_history[0], [3.0, 4.0, 5.0])
    weights = sampler.weights()
    assert weights[0] > weights[1]


def test_unknown_schedule_sampler():
    with pytest.raises(ConfigError, match="--schedule_sampler"):
        create_named_schedule_sampler("importance", make_diffusion(5, "cosine"))


# ---------------------------------------------------------------- the training window


@pytest.mark.parametrize("name", ["uniform", "loss-second-moment"])
def test_window_draws_only_levels_in_range(name):
    d = make_diffusion(100, "cosine")
    sampler = create_named_schedule_sampler(name, d, t_range=(25, 30))
    t, w = sampler.sample(3000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 25 and t.max() <= 30
    assert set(t.tolist()) == set(range(25, 31))
    assert torch.equal(w, torch.ones(3000))


@pytest.mark.parametrize("name", ["uniform", "loss-second-moment"])
def test_window_mix_sends_its_share_to_the_whole_chain(name):
    d = make_diffusion(100, "cosine")
    sampler = create_named_schedule_sampler(name, d, t_range=(25, 30), t_range_mix=0.3)
    assert isinstance(sampler, WindowMixture)
    generator = torch.Generator().manual_seed(1)
    outside, total = 0, 0
    for batch in (1, 3, 8):  # microbatches of one get their share on average too
        for _ in range(400):
            t, w = sampler.sample(batch, "cpu", generator=generator)
            n_out = int(((t < 25) | (t > 30)).sum())
            # floor(0.3 * n + u) examples go to the whole chain: never more than ceil(0.3 * n).
            assert n_out <= math.ceil(0.3 * batch)
            outside += n_out
            total += batch
            assert torch.equal(w, torch.ones(batch))
    # Whole-chain draws land in the window ~6% of the time, so the share outside is ~0.3 * 0.94.
    assert outside / total == pytest.approx(0.3 * 94 / 100, abs=0.03)


def test_window_mix_count_per_batch_is_the_rounded_share():
    d = make_diffusion(1000, "cosine")
    sampler = create_named_schedule_sampler("uniform", d, t_range=(250, 300), t_range_mix=0.25)
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):
        t, _ = sampler.sample(8, "cpu", generator=generator)
        # 2 of 8 from the whole chain (which may itself hit the window); 6 always inside it.
        assert int(((t >= 250) & (t <= 300)).sum()) >= 6


def test_loss_aware_window_warms_up_on_the_window_alone_and_keeps_its_state():
    d = make_diffusion(100, "cosine")
    sampler = create_named_schedule_sampler("loss-second-moment", d, t_range=(20, 23), t_range_mix=0.5)
    window = torch.arange(20, 24)
    for _ in range(10):
        # Losses of levels outside the window (the whole-chain share) are not recorded.
        sampler.update_with_local_losses(torch.tensor([0, 50, 99]), torch.tensor([5.0, 5.0, 5.0]))
        sampler.update_with_local_losses(window, torch.tensor([0.1, 0.1, 10.0, 10.0]))
    inner = sampler.window.weights()
    assert inner.shape == (4,) and inner[2:].min() > 50 * inner[:2].max()
    state = sampler.state_dict()
    again = create_named_schedule_sampler("loss-second-moment", d, t_range=(20, 23), t_range_mix=0.5)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.window.weights(), inner)
    other = create_named_schedule_sampler("loss-second-moment", d, t_range=(20, 40))
    with pytest.raises(ConfigError, match="t_range"):
        other.load_state_dict(state)


@pytest.mark.parametrize("text,expected", [("", None), ("250,300", (250, 300)), (" 5 , 5 ", (5, 5))])
def test_parse_t_range(text, expected):
    assert parse_t_range(text, 1000) == expected


@pytest.mark.parametrize("text", ["300,250", "250", "a,b", "900,1000", "-1,5"])
def test_parse_t_range_errors_name_the_flag(text):
    with pytest.raises(ConfigError, match="--t_range"):
        parse_t_range(text, 1000)
