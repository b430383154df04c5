"""The samplers behind sample.py: plans, the truncated ADDPM process, baselines and ensembles."""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.errors import ConfigError
from guided_diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from evaluation.uncertainty import channel_statistics, fuse_channels
from guided_diffusion.mask_space import (
    MASK_SPACES,
    class_distribution,
    hard_channels,
    to_diffusion_space,
    to_probability,
)
from guided_diffusion.script_util import create_model
from guided_diffusion.seg_sampling import plan_sampler, sample_members

IMAGE_CHANNELS = 2


class OracleEps(torch.nn.Module):
    """A diffusion model that knows x0 (the label in diffusion space) per batch row.

    It returns the exact eps of whatever x_t it is given, reading x_t from the last input
    channel and undoing the diffusion's timestep rescaling, and records the levels it saw
    and the images it was conditioned on.
    """

    def __init__(self, diffusion, x0):
        super().__init__()
        self.diffusion = diffusion
        self.x0 = x0
        self.levels = []
        self.images = None

    def forward(self, inp, ts):
        channels = self.x0.shape[1]
        x_t = inp[:, -channels:]
        self.images = inp[:, :-channels]
        if self.diffusion.rescale_timesteps:
            t = torch.round(ts * self.diffusion.num_timesteps / 1000.0).long()
        else:
            t = ts.long()
        assert bool((t == t[0]).all())
        self.levels.append(int(t[0]))
        abar = torch.as_tensor(self.diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
        eps = (x_t.double() - abar.sqrt() * self.x0.double()) / (1.0 - abar).sqrt()
        return eps.to(x_t.dtype)


class RecordingDenoiser:
    """A perfect denoising net: returns the label, and keeps the x_T and images it was handed."""

    def __init__(self, label_members):
        self.label_members = label_members
        self.x_T = None
        self.images = None

    def __call__(self, x_T, images):
        self.x_T = x_T.clone()
        self.images = images.clone()
        return self.label_members.clone()


def cosine_diffusion(steps=1000, **flags):
    return GaussianDiffusion(betas=get_named_beta_schedule("cosine", steps), **flags)


def two_labels(size):
    """Two distinct {0,1} labels [2, 1, size, size] (both classes in each)."""
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()
    label[:, :, 0, 0] = 1.0
    label[:, :, 0, 1] = 0.0
    return label


def images_for(batch, size, seed=1):
    return torch.randn(batch, IMAGE_CHANNELS, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- plans


@pytest.mark.parametrize(
    "sampler,kwargs,evaluations,first,last",
    [
        ("addpm", dict(pre_t=300, T=250), 50, 300, 250),
        ("addpm", dict(pre_t=300, T=250, sampling_steps=10), 10, 300, 250),
        ("addpm", dict(pre_t=300, T=250, final_step="x0"), 51, 300, 250),
        ("addpm", dict(pre_t=300, T=250, sampling_steps=10, final_step="x0"), 11, 300, 250),
        ("ddpm", dict(), 1000, 999, -1),
        ("ddim", dict(sampling_steps=100), 100, 990, -1),
        ("preseg", dict(), 0, None, None),
    ],
)
def test_plan_unet_evaluations(sampler, kwargs, evaluations, first, last):
    plan = plan_sampler(sampler, num_timesteps=1000, **kwargs)
    assert plan.unet_evaluations == evaluations
    if first is not None:
        assert plan.timesteps[0] == first and plan.timesteps[-1] == last
        assert all(a > b for a, b in zip(plan.timesteps, plan.timesteps[1:]))


def test_plan_addpm_spaced_levels_and_method():
    plan = plan_sampler("addpm", num_timesteps=1000, sampling_steps=10, step_method="ddim", eta=0.5)
    assert plan.timesteps == (300, 295, 290, 285, 280, 275, 270, 265, 260, 255, 250)
    assert (plan.method, plan.eta, plan.final_step) == ("ddim", 0.5, "denoiser")


@pytest.mark.parametrize(
    "sampler,kwargs,flag",
    [
        ("plms", dict(), "--sampler"),
        ("addpm", dict(step_method="euler"), "--step_method"),
        ("addpm", dict(final_step="argmax"), "--final_step"),
        ("addpm", dict(sampling_steps=-1), "--sampling_steps"),
        ("addpm", dict(sampling_steps=51), "--sampling_steps"),
        ("addpm", dict(eta=1.5), "--eta"),
        ("addpm", dict(pre_t=250, T=250), "--pre_t"),
        ("addpm", dict(pre_t=1000, T=250), "--pre_t"),
        ("addpm", dict(pre_t=300, T=-1), "--T"),
        ("ddim", dict(), "--sampling_steps"),
        ("ddim", dict(sampling_steps=300), "--sampling_steps"),
        ("ddim", dict(sampling_steps=2000), "--sampling_steps"),
        ("ddpm", dict(sampling_steps=2000), "--sampling_steps"),
    ],
)
def test_plan_bad_flags_are_config_errors_naming_the_flag(sampler, kwargs, flag):
    with pytest.raises(ConfigError, match=flag) as info:
        plan_sampler(sampler, num_timesteps=1000, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_inputs_are_config_errors():
    d = cosine_diffusion(20)
    images = images_for(1, 4)
    probs = torch.ones(1, 1, 4, 4)
    common = dict(diffusion=d, model=None, images=images, mask_space="pm1")
    with pytest.raises(ConfigError, match="--preseg_path"):
        sample_members(plan_sampler("addpm", num_timesteps=20, pre_t=10, T=5), num_ensemble=1, **common)
    with pytest.raises(ConfigError, match="--preseg_path"):
        sample_members(plan_sampler("preseg", num_timesteps=20), num_ensemble=1, **common)
    with pytest.raises(ConfigError, match="--denoiser_path"):
        sample_members(
            plan_sampler("addpm", num_timesteps=20, pre_t=10, T=5), num_ensemble=1,
            preseg_probs=probs, **common,
        )
    with pytest.raises(ConfigError, match="--num_ensemble"):
        sample_members(plan_sampler("preseg", num_timesteps=20), num_ensemble=0, preseg_probs=probs, **common)


def test_preseg_sampler_returns_the_preseg_probabilities():
    d = cosine_diffusion(20)
    probs = torch.rand(2, 1, 4, 4)
    out = sample_members(
        plan_sampler("preseg", num_timesteps=20), diffusion=d, model=None, images=images_for(2, 4),
        num_ensemble=5, mask_space="pm1", preseg_probs=probs,
    )
    assert out.shape == (2, 1, 1, 4, 4)
    assert torch.equal(out[:, 0], probs)


# ---------------------------------------------------------------- ADDPM with an oracle


@pytest.mark.parametrize("mask_space", MASK_SPACES)
@pytest.mark.parametrize("rescale_timesteps", [False, True])
def test_addpm_with_oracle_returns_label_and_hands_denoiser_level_T(mask_space, rescale_timesteps):
    # Fixed-small variance: with an exact x0 the posterior keeps q(x_s | x0) at every level,
    # so x_T must be distributed exactly as q_sample(s(label), T).
    d = cosine_diffusion(1000, sigma_small=True, rescale_timesteps=rescale_timesteps)
    pre_t, T, members = 300, 250, 10000
    label = two_labels(2)
    images = images_for(2, 2)
    x0 = to_diffusion_space(label, mask_space).repeat_interleave(members, dim=0)
    label_members = label.repeat_interleave(members, dim=0)
    model = OracleEps(d, x0)
    denoiser = RecordingDenoiser(label_members)
    plan = plan_sampler("addpm", num_timesteps=1000, pre_t=pre_t, T=T)
    probs = sample_members(
        plan, diffusion=d, model=model, images=images, num_ensemble=members, mask_space=mask_space,
        preseg_probs=label, denoise_fn=denoiser, generator=torch.Generator().manual_seed(3),
    )

    assert probs.shape == (2, members, 1, 2, 2)
    assert torch.equal(probs, label.unsqueeze(1).expand(2, members, 1, 2, 2))
    assert model.levels == list(range(pre_t, T, -1))
    assert torch.equal(denoiser.images, images.repeat_interleave(members, dim=0))
    assert torch.equal(model.images, denoiser.images)

    abar = d.alphas_cumprod[T]
    var = 1.0 - abar
    x_T = denoiser.x_T.double().view(2, members, 4)
    target = math.sqrt(abar) * to_diffusion_space(label, mask_space).view(2, 4).double().numpy()
    np.testing.assert_allclose(x_T.mean(1).numpy(), target, atol=4 * math.sqrt(var / members))
    np.testing.assert_allclose(x_T.var(1).numpy(), var, atol=4 * var * math.sqrt(2.0 / members))


@pytest.mark.parametrize("mask_space", MASK_SPACES)
@pytest.mark.parametrize("step_method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_addpm_spaced_and_x0_final_step_with_oracle(mask_space, step_method, eta):
    d = cosine_diffusion(1000)
    label = two_labels(8)
    images = images_for(2, 8)
    members = 3
    x0 = to_diffusion_space(label, mask_space).repeat_interleave(members, dim=0)
    model = OracleEps(d, x0)
    plan = plan_sampler(
        "addpm", num_timesteps=1000, pre_t=300, T=250, sampling_steps=10,
        step_method=step_method, eta=eta, final_step="x0",
    )
    probs = sample_members(
        plan, diffusion=d, model=model, images=images, num_ensemble=members, mask_space=mask_space,
        preseg_probs=label, generator=torch.Generator().manual_seed(4),
    )
    assert len(model.levels) == plan.unet_evaluations == 11
    assert model.levels == list(plan.timesteps[:-1]) + [250]
    torch.testing.assert_close(probs, label.unsqueeze(1).expand(2, members, 1, 8, 8), atol=1e-5, rtol=0)


def test_addpm_thresholds_soft_preseg_probabilities():
    # The start state noises the binarised pre-segmentation, as ADDPM does with its mask.
    d = cosine_diffusion(100)
    label = two_labels(4)
    soft = torch.where(label > 0.5, torch.full_like(label, 0.7), torch.full_like(label, 0.2))
    model = OracleEps(d, to_diffusion_space(label, "pm1"))
    denoiser = RecordingDenoiser(label)
    plan = plan_sampler("addpm", num_timesteps=100, pre_t=30, T=29)
    runs = []
    for preseg in (label, soft):
        sample_members(
            plan, diffusion=d, model=model, images=images_for(2, 4), num_ensemble=1, mask_space="pm1",
            preseg_probs=preseg, denoise_fn=denoiser, generator=torch.Generator().manual_seed(5),
        )
        runs.append(denoiser.x_T)
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------- baselines with an oracle


@pytest.mark.parametrize("mask_space", MASK_SPACES)
@pytest.mark.parametrize(
    "sampler,kwargs,evaluations",
    [
        ("ddpm", dict(), 50),
        ("ddpm", dict(sampling_steps=10), 10),
        ("ddim", dict(sampling_steps=10), 10),
        ("ddim", dict(sampling_steps=10, eta=1.0), 10),
    ],
)
def test_ddpm_and_ddim_recover_label_from_pure_noise(mask_space, sampler, kwargs, evaluations):
    d = cosine_diffusion(50, rescale_timesteps=True)
    label = two_labels(8)
    members = 2
    model = OracleEps(d, to_diffusion_space(label, mask_space).repeat_interleave(members, dim=0))
    plan = plan_sampler(sampler, num_timesteps=50, **kwargs)
    probs = sample_members(
        plan, diffusion=d, model=model, images=images_for(2, 8), num_ensemble=members,
        mask_space=mask_space, generator=torch.Generator().manual_seed(6),
    )
    assert len(model.levels) == plan.unet_evaluations == evaluations
    assert model.levels[0] == plan.timesteps[0] and model.levels[-1] == 0
    torch.testing.assert_close(probs, label.unsqueeze(1).expand(2, members, 1, 8, 8), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- ensembles with a real UNet


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    model = create_model(
        image_size=16, image_channels=IMAGE_CHANNELS, num_channels=8, num_res_blocks=1,
        num_heads=1, num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="",
        channel_mult="1,2", dropout=0.0, class_cond=False, learn_sigma=False,
        use_checkpoint=False, use_scale_shift_norm=False, resblock_updown=False,
        use_new_attention_order=False,
    )
    # The UNet's last conv starts at zero; small weights make its eps depend on the input.
    torch.nn.init.normal_(model.out[-1].weight, std=0.05)
    return model.eval()


def threshold_denoiser(diffusion, T, mask_space):
    """A fixed one-step map x_T -> probabilities (x_T / sqrt(abar_T), mapped back)."""
    scale = 1.0 / math.sqrt(diffusion.alphas_cumprod[T])

    def denoise(x_T, images):
        return to_probability(x_T * scale, mask_space)

    return denoise


ENSEMBLE_PLANS = [
    ("addpm", dict(pre_t=12, T=6)),
    ("addpm", dict(pre_t=12, T=6, sampling_steps=3, step_method="ddim", eta=0.5)),
    ("ddpm", dict()),
    ("ddim", dict(sampling_steps=5)),
]


def run_ensemble(sampler, kwargs, seed, images, preseg, members=4, model=None):
    d = cosine_diffusion(20)
    plan = plan_sampler(sampler, num_timesteps=20, **kwargs)
    return sample_members(
        plan, diffusion=d, model=model or tiny_unet(), images=images, num_ensemble=members,
        mask_space="pm1", preseg_probs=preseg, denoise_fn=threshold_denoiser(d, 6, "pm1"),
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("sampler,kwargs", ENSEMBLE_PLANS)
def test_ensemble_members_differ_and_a_seed_reproduces_bit_for_bit(sampler, kwargs):
    images = images_for(2, 16)
    preseg = (images[:, :1] > 0).float()
    model = tiny_unet()
    first = run_ensemble(sampler, kwargs, 11, images, preseg, model=model)
    again = run_ensemble(sampler, kwargs, 11, images, preseg, model=model)
    other = run_ensemble(sampler, kwargs, 12, images, preseg, model=model)
    assert first.shape == (2, 4, 1, 16, 16) and first.dtype == torch.float32
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    for b in range(2):
        for k in range(1, 4):
            assert not torch.equal(first[b, 0], first[b, k])


def test_ensemble_members_are_conditioned_on_their_own_image():
    # Batching is [img0 x K, img1 x K]: the model must see each image repeated K times, in order.
    d = cosine_diffusion(20)
    label = two_labels(4)
    images = images_for(2, 4)
    members = 3
    model = OracleEps(d, to_diffusion_space(label, "pm1").repeat_interleave(members, dim=0))
    sample_members(
        plan_sampler("ddim", num_timesteps=20, sampling_steps=4), diffusion=d, model=model,
        images=images, num_ensemble=members, mask_space="pm1",
    )
    assert torch.equal(model.images, images.repeat_interleave(members, dim=0))


def test_timestep_respacing_strings_plan_the_noise_samplers():
    plan = plan_sampler("ddpm", num_timesteps=1000, timestep_respacing="10,10,10")
    assert plan.unet_evaluations == 30 and plan.timesteps[-1] == -1
    plan = plan_sampler("ddim", num_timesteps=1000, timestep_respacing="ddim50")
    assert plan.unet_evaluations == 50 and plan.method == "ddim"
    with pytest.raises(ConfigError, match="--timestep_respacing"):
        plan_sampler("addpm", num_timesteps=1000, timestep_respacing="250")
    with pytest.raises(ConfigError, match="not both"):
        plan_sampler("ddpm", num_timesteps=1000, sampling_steps=100, timestep_respacing="250")


# ---------------------------------------------------------------- K mask channels with an oracle


def three_channel_labels(size, exclusive):
    """Two labels [2, 3, size, size] {0,1}: three exclusive classes (with background), or three
    nested regions (BraTS WT > TC > ET); every channel is on somewhere and off somewhere."""
    g = torch.Generator().manual_seed(7)
    values = torch.randint(0, 4, (2, size, size), generator=g)
    values[:, 0, :4] = torch.arange(4)
    if exclusive:
        channels = [values == k for k in (1, 2, 3)]
    else:
        channels = [values >= 1, values >= 2, values == 3]
    return torch.stack(channels, dim=1).float()


def oracle_channels_run(sampler, kwargs, exclusive, mask_space, num_timesteps, members=2, preseg=None):
    d = cosine_diffusion(num_timesteps, rescale_timesteps=True)
    label = three_channel_labels(8, exclusive)
    label_members = label.repeat_interleave(members, dim=0)
    model = OracleEps(d, to_diffusion_space(label_members, mask_space))
    plan = plan_sampler(sampler, num_timesteps=num_timesteps, **kwargs)
    denoiser = RecordingDenoiser(label_members)
    probs = sample_members(
        plan, diffusion=d, model=model, images=images_for(2, 8), num_ensemble=members,
        mask_space=mask_space, preseg_probs=label if preseg is None else preseg(label),
        denoise_fn=denoiser, generator=torch.Generator().manual_seed(8),
        mask_channels=3, exclusive=exclusive,
    )
    return label, probs, denoiser


CHANNEL_SAMPLERS = [
    ("ddpm", dict(), 50),
    ("ddim", dict(sampling_steps=10), 50),
    ("addpm", dict(pre_t=30, T=20), 50),
    # The UNet's own x0 at T reads the chain's x_T, which the oracle denoiser above ignores.
    ("addpm", dict(pre_t=30, T=20, final_step="x0"), 50),
    ("addpm", dict(pre_t=30, T=20, sampling_steps=5, step_method="ddim", final_step="x0"), 50),
    ("preseg", dict(), 50),
]


@pytest.mark.parametrize("exclusive", [True, False], ids=["classes", "regions"])
@pytest.mark.parametrize("mask_space", MASK_SPACES)
@pytest.mark.parametrize("sampler,kwargs,steps", CHANNEL_SAMPLERS)
def test_every_sampler_recovers_each_of_three_channels(sampler, kwargs, steps, mask_space, exclusive):
    label, probs, _ = oracle_channels_run(sampler, kwargs, exclusive, mask_space, steps)
    members = 1 if sampler == "preseg" else 2
    want = label.unsqueeze(1).expand(2, members, 3, 8, 8)
    assert probs.shape == want.shape
    torch.testing.assert_close(probs, want, atol=1e-4, rtol=0)
    for b in range(2):
        for fusion in ("mean", "vote"):
            _, mask = fuse_channels(probs[b], fusion, exclusive)
            assert torch.equal(mask.float(), label[b]), (fusion, b)


@pytest.mark.parametrize("exclusive", [True, False], ids=["classes", "regions"])
def test_truncated_start_takes_the_hard_channels_of_a_soft_preseg(exclusive):
    # Soft probabilities whose decision (argmax with background, or >= 0.5) is the label.
    def soft(label):
        return label * 0.55 + (1 - label) * 0.1 if not exclusive else label * 0.5 + (1 - label) * 0.1

    # The x_T handed to the denoising net: the same chain from the same start, bit for bit.
    starts = []
    for preseg in (None, soft):
        label, _, denoiser = oracle_channels_run("addpm", dict(pre_t=30, T=20), exclusive, "pm1", 50,
                                                 preseg=preseg)
        if preseg is not None:
            assert torch.equal(hard_channels(preseg(label), exclusive), label)
            assert not torch.equal(preseg(label), label)
        starts.append(denoiser.x_T)
    assert torch.equal(starts[0], starts[1])
    # A soft pre-segmentation taken as it is would start the chain elsewhere.
    _, _, other = oracle_channels_run("addpm", dict(pre_t=30, T=20), exclusive, "pm1", 50,
                                      preseg=lambda label: 1 - label)
    assert not torch.equal(other.x_T, starts[0])


def test_a_preseg_of_other_channels_is_refused():
    d = cosine_diffusion(20)
    with pytest.raises(ConfigError, match="channels"):
        sample_members(plan_sampler("preseg", num_timesteps=20), diffusion=d, model=None,
                       images=images_for(1, 4), num_ensemble=1, mask_space="pm1",
                       preseg_probs=torch.rand(1, 1, 4, 4), mask_channels=3)


@pytest.mark.parametrize("sampler,kwargs", [("ddim", dict(sampling_steps=10)),
                                            ("addpm", dict(pre_t=30, T=20, final_step="x0"))])
def test_classes_claimed_together_by_the_unet_become_a_distribution(sampler, kwargs):
    """The UNet predicts each class channel on its own: where it claims two classes at once, the
    members' probabilities are divided by their sum (the decision is kept), so the entropy over
    background and classes is that of a distribution (ln 2 for two classes at 1, not 0)."""
    d = cosine_diffusion(50, rescale_timesteps=True)
    label = three_channel_labels(8, exclusive=True)
    label[:, 1, 0, 0] = label[:, 2, 0, 0] = 1.0  # classes 2 and 3 both claim pixel (0, 0)
    label[:, 0, 0, 0] = 0.0
    members = 2
    model = OracleEps(d, to_diffusion_space(label.repeat_interleave(members, dim=0), "pm1"))
    probs = sample_members(plan_sampler(sampler, num_timesteps=50, **kwargs), diffusion=d, model=model,
                           images=images_for(2, 8), num_ensemble=members, mask_space="pm1",
                           preseg_probs=label, generator=torch.Generator().manual_seed(3),
                           mask_channels=3, exclusive=True)
    assert float(probs.sum(dim=2).max()) <= 1.0 + 1e-6
    torch.testing.assert_close(probs[:, :, 1:, 0, 0], torch.full((2, members, 2), 0.5), atol=1e-4, rtol=0)
    # Elsewhere the label comes back as it is.
    torch.testing.assert_close(probs[..., 1:, :], label.unsqueeze(1).expand_as(probs)[..., 1:, :], atol=1e-4, rtol=0)
    stats = channel_statistics(probs[0], exclusive=True)
    assert float(stats["entropy"][0, 0]) == pytest.approx(math.log(2), abs=1e-3)
    # Regions may overlap: their channels are left as they are.
    region_probs = class_distribution(torch.ones(1, 3, 2, 2), exclusive=False)
    assert torch.equal(region_probs, torch.ones(1, 3, 2, 2))
