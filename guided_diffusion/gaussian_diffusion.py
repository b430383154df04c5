"""Gaussian diffusion for conditional mask segmentation (improved-diffusion semantics).

Conventions:

- Timesteps are 0-based: ``t = 0`` is the least noisy level, ``abar[t] = alphas_cumprod[t]``.
  Level ``-1`` means "clean" (``abar = 1``): stepping to it returns the x0 estimate.
- The model predicts eps for the mask channels (or x0 itself with ``predict_xstart``, as
  improved-diffusion's ``ModelMeanType.START_X``; plus the variance interpolation ``v`` when
  ``learn_sigma``) from ``build_model_input(image, x_t)`` and ``scale_timesteps(t)``.
- Every reverse step goes from a level ``t`` to any lower level ``s`` (``-1 <= s < t``). For the
  pair we use the respaced-chain quantities of improved-diffusion's ``respace.py``:

      alpha_{t|s} = abar_t / abar_s,     beta_{t|s} = 1 - alpha_{t|s}
      q(x_s | x_t, x0) = N( sqrt(abar_s) beta_{t|s} / (1 - abar_t) * x0
                            + sqrt(alpha_{t|s}) (1 - abar_s) / (1 - abar_t) * x_t,
                            beta_{t|s} (1 - abar_s) / (1 - abar_t) )

  With ``s = t - 1`` these are exactly the full chain's posterior (Ho et al. 2020, eq. 6-7),
  and for the kept steps of a respaced chain they equal the posterior of the chain rebuilt
  from ``respace.respaced_betas``, so one object serves the full chain, respaced sampling
  and the truncated ADDPM segment [pre_t ... T] without rebuilding anything.

Numerics: per-level quantities are derived from a cached table of ``log(abar)`` on the
sampling device, in float64 (float32 on MPS, which has no float64), and cast to the data's
dtype at the end. ``beta_{t|s} = -expm1(log abar_t - log abar_s)`` keeps the small betas near
t = 0 accurate.
"""

import math
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from guided_diffusion.errors import ConfigError

BETA_SCHEDULES = ("linear", "cosine")
SAMPLING_METHODS = ("ddpm", "ddim")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named noise schedule.

    ``"linear"`` scales Ho et al.'s 1e-4 .. 0.02 (defined for 1000 steps) by ``1000 / N`` so
    that any number of steps covers the same noise range, as improved-diffusion does.
    ``"cosine"`` is Nichol & Dhariwal (2021), eq. 17, with betas clipped at 0.999.

    :return: float64 array of shape [num_diffusion_timesteps].
    """
    if isinstance(num_diffusion_timesteps, bool) or not isinstance(
        num_diffusion_timesteps, (int, np.integer)
    ) or num_diffusion_timesteps < 1:
        raise ConfigError(
            f"--diffusion_steps must be a positive integer, got {num_diffusion_timesteps!r}"
        )
    n = int(num_diffusion_timesteps)
    if name == "linear":
        if n <= 20:
            # The last beta, 0.02 * 1000 / N, would reach 1 and leave no signal to invert.
            raise ConfigError(
                f"--noise_schedule linear needs --diffusion_steps > 20, got {n} (use cosine for fewer steps)"
            )
        scale = 1000.0 / n
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            n, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ConfigError(
        f"--noise_schedule: unknown schedule {name!r} (choose one of {', '.join(BETA_SCHEDULES)})"
    )


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(u)``, u in [0, 1], into betas.

    ``beta_i = min(1 - alpha_bar((i+1)/N) / alpha_bar(i/N), max_beta)``; the cap avoids a
    singular last step where ``alpha_bar(1) = 0``.

    :return: float64 array of shape [num_diffusion_timesteps].
    """
    n = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64)


def build_model_input(image: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """The conditional UNet's input: image channels first, then the noisy mask.

    This is the only place that decides the layout, used by training and sampling alike.

    :param image: [B, C, H, W] conditioning image.
    :param x_t: [B, M, H, W] noisy mask in diffusion space.
    :return: [B, C + M, H, W].
    """
    return torch.cat([image, x_t], dim=1)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, tanh approximation (as improved-diffusion, for identical vb values)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] under a Gaussian discretised into 256 bins.

    The outermost bins extend to -inf / +inf, so the mask values -1 and +1 of the ``"pm1"``
    space sit in the edge bins. Elementwise, in nats.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


class _PairCoefficients:
    """Per-sample coefficients for a step from level t to level s, shaped [B, 1, ..., 1]."""

    __slots__ = (
        "sqrt_abar_t",
        "sqrt_one_minus_abar_t",
        "sqrt_recip_abar_t",
        "sqrt_recipm1_abar_t",
        "abar_s",
        "sqrt_abar_s",
        "one_minus_abar_s",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "log_beta",
        "large_variance",
        "large_log_variance",
        "is_final",
    )


class GaussianDiffusion:
    """Diffusion over the mask channels, conditioned on an image.

    :param betas: 1-D array of betas of the full chain (length N = num_timesteps).
    :param learn_sigma: the model outputs 2*M channels, eps then ``v`` in [-1, 1], and the
        variance interpolates in log space between the posterior variance (v = -1) and
        beta (v = +1) (Nichol & Dhariwal, eq. 15). Training adds the variational-bound term.
    :param sigma_small: with fixed variance, use the posterior variance instead of beta.
    :param rescale_timesteps: feed the model ``t * 1000 / N`` (float) instead of ``t``.
    :param rescale_learned_sigmas: multiply the vb term by ``N / 1000`` (improved-diffusion's
        ``RESCALED_MSE`` hybrid loss).
    :param predict_xstart: the model's mask channels are the x0 estimate instead of eps; eps is
        derived from it (the same reverse steps, DDIM included, follow).
    """

    def __init__(
        self,
        *,
        betas,
        learn_sigma: bool = False,
        sigma_small: bool = False,
        rescale_timesteps: bool = False,
        rescale_learned_sigmas: bool = False,
        predict_xstart: bool = False,
    ):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ConfigError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas < 1).all()):
            raise ConfigError("betas must lie in (0, 1); check --noise_schedule and --diffusion_steps")
        self.learn_sigma = bool(learn_sigma)
        self.sigma_small = bool(sigma_small)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.rescale_learned_sigmas = bool(rescale_learned_sigmas)
        self.predict_xstart = bool(predict_xstart)

        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 for the last step (t = 0 -> clean); improved-diffusion
        # uses the next one up instead so that its log, the fixed-large variance there and the
        # decoder likelihood stay finite. Steps to level -1 from any t reuse that value.
        self._final_step_variance = float(
            self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self._final_step_variance, self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # log(abar) indexed by level + 1, so that level -1 (clean, abar = 1) sits at index 0.
        self._log_abar_levels = np.append(0.0, np.cumsum(np.log(alphas)))
        self._tables = {}

    # ------------------------------------------------------------------ helpers

    def scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model sees: ``t * 1000 / N`` (float) if rescale_timesteps, else t."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def _log_abar_table(self, device: torch.device) -> torch.Tensor:
        """log(abar) per level + 1 on ``device``; built once per device, not per step."""
        key = str(device)
        table = self._tables.get(key)
        if table is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = torch.as_tensor(self._log_abar_levels, dtype=dtype, device=device)
            self._tables[key] = table
        return table

    @staticmethod
    def _prev_levels(t: torch.Tensor, t_prev) -> torch.Tensor:
        if t_prev is None:
            return t - 1
        if isinstance(t_prev, torch.Tensor):
            return t_prev.to(device=t.device, dtype=torch.long).expand_as(t)
        return torch.full_like(t, int(t_prev))

    def _pair(self, t: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> _PairCoefficients:
        """Coefficients of the step t -> s (elementwise over the batch) in x's dtype/device."""
        table = self._log_abar_table(x.device)
        t = t.to(device=x.device, dtype=torch.long)
        s = s.to(device=x.device, dtype=torch.long)
        la_t = table[t + 1]
        la_s = table[s + 1]
        log_alpha_ts = la_t - la_s
        beta_ts = -torch.expm1(log_alpha_ts)
        one_minus_abar_t = -torch.expm1(la_t)
        one_minus_abar_s = -torch.expm1(la_s)
        abar_s = torch.exp(la_s)
        is_final = s < 0
        final_var = torch.full_like(beta_ts, self._final_step_variance)

        post_var = beta_ts * one_minus_abar_s / one_minus_abar_t
        large_var = torch.where(is_final, final_var, beta_ts)

        shape = (-1,) + (1,) * (x.dim() - 1)

        def cast(v):
            return v.to(x.dtype).view(shape)

        c = _PairCoefficients()
        c.sqrt_abar_t = cast(torch.exp(0.5 * la_t))
        c.sqrt_one_minus_abar_t = cast(torch.sqrt(one_minus_abar_t))
        c.sqrt_recip_abar_t = cast(torch.exp(-0.5 * la_t))
        c.sqrt_recipm1_abar_t = cast(torch.sqrt(torch.expm1(-la_t)))
        c.abar_s = cast(abar_s)
        c.sqrt_abar_s = cast(torch.sqrt(abar_s))
        c.one_minus_abar_s = cast(one_minus_abar_s)
        c.posterior_mean_coef1 = cast(torch.sqrt(abar_s) * beta_ts / one_minus_abar_t)
        c.posterior_mean_coef2 = cast(torch.exp(0.5 * log_alpha_ts) * one_minus_abar_s / one_minus_abar_t)
        c.posterior_variance = cast(post_var)
        c.posterior_log_variance_clipped = cast(torch.log(torch.where(is_final, final_var, post_var)))
        c.log_beta = cast(torch.log(beta_ts))
        c.large_variance = cast(large_var)
        c.large_log_variance = cast(torch.log(large_var))
        c.is_final = is_final.view(shape)
        return c

    def _split_output(self, output: torch.Tensor, x_t: torch.Tensor):
        """Split the model output into (mask prediction, v): the mask channels are eps (or x0
        with predict_xstart); v is None without learn_sigma."""
        m = x_t.shape[1]
        expected = 2 * m if self.learn_sigma else m
        if output.shape[1] != expected:
            raise ConfigError(
                f"the model returns {output.shape[1]} channels but the diffusion expects "
                f"{expected} ({m} mask channels, --learn_sigma {self.learn_sigma}); "
                "the model and diffusion flags do not match"
            )
        output = output.to(x_t.dtype)
        if self.learn_sigma:
            eps, v = torch.split(output, m, dim=1)
            return eps, v
        return output, None

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x_start, t, noise=None, generator=None) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I).

        :param x_start: [B, M, ...] clean mask in diffusion space.
        :param t: LongTensor [B], 0-based levels.
        :param noise: optional [B, M, ...] standard normal noise; drawn with ``generator``
            if not given.
        :return: x_t, same shape as x_start.
        """
        if noise is None:
            noise = torch.randn(
                x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype
            )
        c = self._pair(t, t - 1, x_start)
        return c.sqrt_abar_t * x_start + c.sqrt_one_minus_abar_t * noise

    def q_posterior_mean_variance(self, x_start, x_t, t, t_prev=None):
        """Mean and variance of q(x_s | x_t, x0) for s = t_prev (default t - 1).

        ``t_prev == -1`` (clean) gives mean x0 and variance 0; its log variance is then the
        clipped value described in the module docstring, as improved-diffusion returns.

        :param x_start, x_t: [B, M, ...].
        :param t: LongTensor [B]; ``t_prev``: None, an int, or LongTensor [B] with t_prev < t.
        :return: (mean [B, M, ...], variance [B, 1, ...], log_variance [B, 1, ...]).
        """
        s = self._prev_levels(t, t_prev)
        c = self._pair(t, s, x_t)
        mean = c.posterior_mean_coef1 * x_start + c.posterior_mean_coef2 * x_t
        return mean, c.posterior_variance, c.posterior_log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def _p_mean_variance_from_output(self, output, x_t, t, s, clip_denoised):
        prediction, v = self._split_output(output, x_t)
        c = self._pair(t, s, x_t)
        if self.learn_sigma:
            # v in [-1, 1] interpolates log-variance between posterior (v=-1) and beta (v=+1).
            frac = (v + 1.0) / 2.0
            log_variance = frac * c.log_beta + (1.0 - frac) * c.posterior_log_variance_clipped
            variance = torch.exp(log_variance)
        elif self.sigma_small:
            variance = c.posterior_variance.expand_as(x_t)
            log_variance = c.posterior_log_variance_clipped.expand_as(x_t)
        else:
            variance = c.large_variance.expand_as(x_t)
            log_variance = c.large_log_variance.expand_as(x_t)
        if self.predict_xstart:
            pred_xstart = prediction
            eps = (c.sqrt_recip_abar_t * x_t - pred_xstart) / c.sqrt_recipm1_abar_t
        else:
            eps = prediction
            pred_xstart = c.sqrt_recip_abar_t * x_t - c.sqrt_recipm1_abar_t * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean = c.posterior_mean_coef1 * pred_xstart + c.posterior_mean_coef2 * x_t
        out = {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }
        return out, c

    def p_mean_variance(self, model, image, x_t, t, t_prev=None, clip_denoised=True) -> dict:
        """Model distribution p(x_s | x_t) for s = t_prev (default t - 1).

        The model is called once as ``model(build_model_input(image, x_t), scale_timesteps(t))``.

        :param image: [B, C, H, W]; ``x_t``: [B, M, H, W]; ``t``: LongTensor [B].
        :param clip_denoised: clamp the x0 prediction to [-1, 1] before forming the mean.
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and
            ``eps`` (the eps prediction before clipping; derived from x0 with predict_xstart),
            each [B, M, H, W].
        """
        s = self._prev_levels(t, t_prev)
        output = model(build_model_input(image, x_t), self.scale_timesteps(t))
        out, _ = self._p_mean_variance_from_output(output, x_t, t, s, clip_denoised)
        return out

    def p_sample(self, model, image, x_t, t, t_prev=None, generator=None, clip_denoised=True) -> dict:
        """One ancestral (DDPM) step x_t -> x_s, s = t_prev (default t - 1).

        No noise is added on the step to level -1 (the sample is then the mean, i.e. the
        x0 estimate). Noise is drawn every call so that a generator advances the same way
        whatever the levels are.

        :return: dict with ``sample`` [B, M, H, W] and ``pred_xstart`` [B, M, H, W].
        """
        s = self._prev_levels(t, t_prev)
        output = model(build_model_input(image, x_t), self.scale_timesteps(t))
        out, c = self._p_mean_variance_from_output(output, x_t, t, s, clip_denoised)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        if self.learn_sigma:
            std = torch.exp(0.5 * out["log_variance"])
        else:
            # A fixed variance is one value per sample: take its exp on [B, 1, ..., 1], not on
            # every pixel (a per-pixel exp is a multi-threaded region that, on a busy CPU, can
            # cost a third of a small UNet's forward).
            fixed = c.posterior_log_variance_clipped if self.sigma_small else c.large_log_variance
            std = torch.exp(0.5 * fixed)
        keep_noise = (~c.is_final).to(x_t.dtype)
        sample = out["mean"] + keep_noise * std * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_step(
        self, model, image, x_t, t, t_prev, eta=0.0, generator=None, clip_denoised=True
    ) -> dict:
        """One DDIM step x_t -> x_s (Song et al. 2021, eq. 12) for any s = t_prev < t.

        ``sigma = eta * sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))`` (eq. 16);
        eta = 0 is deterministic, eta = 1 has the DDPM posterior's variance. Stepping to
        level -1 returns the x0 prediction.

        :return: dict with ``sample`` and ``pred_xstart``, each [B, M, H, W].
        """
        if eta < 0:
            raise ConfigError(f"DDIM eta must be >= 0, got {eta}")
        s = self._prev_levels(t, t_prev)
        output = model(build_model_input(image, x_t), self.scale_timesteps(t))
        out, c = self._p_mean_variance_from_output(output, x_t, t, s, clip_denoised)
        pred_xstart = out["pred_xstart"]
        # eps consistent with the (possibly clipped) x0 estimate, as improved-diffusion does.
        eps = (c.sqrt_recip_abar_t * x_t - pred_xstart) / c.sqrt_recipm1_abar_t
        sigma = eta * torch.sqrt(c.posterior_variance)
        direction = torch.sqrt((c.one_minus_abar_s - sigma**2).clamp(min=0.0))
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        sample = c.sqrt_abar_s * pred_xstart + direction * eps + sigma * noise
        return {"sample": sample, "pred_xstart": pred_xstart}

    def _check_levels(self, timesteps) -> list:
        levels = [int(v) for v in timesteps]
        if len(levels) < 2:
            raise ConfigError(
                f"sampling needs at least two timesteps (a start and an end level), got {levels}"
            )
        bad_order = any(a <= b for a, b in zip(levels, levels[1:]))
        if bad_order or levels[0] > self.num_timesteps - 1 or levels[-1] < -1:
            shown = levels if len(levels) <= 8 else levels[:4] + ["..."] + levels[-3:]
            raise ConfigError(
                f"sampling timesteps must be strictly decreasing within [{self.num_timesteps - 1}, -1] "
                f"for a {self.num_timesteps}-step diffusion, got {shown}"
            )
        return levels

    @torch.no_grad()
    def sample_loop(
        self,
        model,
        image,
        x_start_state,
        timesteps: Sequence[int],
        *,
        method: str = "ddpm",
        eta: float = 0.0,
        generator=None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> dict:
        """The one reverse loop, over a strictly decreasing list of levels.

        ``timesteps = [tau_0 > tau_1 > ... > tau_K]``, ``tau_K >= -1`` (-1 = clean).
        ``x_start_state`` is the state at level tau_0 (pure noise for tau_0 = N-1, or
        ``q_sample(s(m0), pre_t)`` for ADDPM). Each pair (t, s) costs one model evaluation and
        moves the state to level s by the DDPM posterior of the respaced chain (``"ddpm"``)
        or by DDIM with ``eta`` (``"ddim"``). The returned sample is at level tau_K exactly.

        :param image: [B, C, H, W]; ``x_start_state``: [B, M, H, W].
        :return: dict with ``sample`` (state at tau_K) and ``pred_xstart`` (the x0 estimate of
            the last model evaluation), each [B, M, H, W].
        """
        if method not in SAMPLING_METHODS:
            raise ConfigError(
                f"unknown sampling method {method!r} (choose one of {', '.join(SAMPLING_METHODS)})"
            )
        levels = self._check_levels(timesteps)
        x = x_start_state
        batch = x.shape[0]
        pred_xstart = None
        pairs = list(zip(levels[:-1], levels[1:]))
        for t_level, s_level in tqdm(pairs, desc=f"{method} sampling", disable=not progress):
            t = torch.full((batch,), t_level, dtype=torch.long, device=x.device)
            if method == "ddpm":
                out = self.p_sample(
                    model, image, x, t, s_level, generator=generator, clip_denoised=clip_denoised
                )
            else:
                out = self.ddim_step(
                    model, image, x, t, s_level, eta=eta, generator=generator,
                    clip_denoised=clip_denoised,
                )
            x = out["sample"]
            pred_xstart = out["pred_xstart"]
        return {"sample": x, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------ training

    def _vb_terms_bpd(self, output, x_start, x_t, t):
        """Variational-bound term per sample, in bits per dimension: [B].

        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
        -log p(x0 | x_1-level) for t = 0. The decoder uses improved-diffusion's discretised
        Gaussian likelihood over [-1, 1] (256 bins with open edge bins): for the {-1, +1}
        masks of the "pm1" space this is the probability of the correct edge bin, and it
        keeps vb values identical to improved-diffusion for the same model output.
        """
        s = t - 1
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t, s)
        out, _ = self._p_mean_variance_from_output(output, x_t, t, s, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        kl = kl / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, decoder_nll, kl)

    def training_losses(self, model, image, x_start, t, noise=None, noised_start=None) -> dict:
        """Per-sample training losses for one batch.

        :param image: [B, C, H, W] conditioning image.
        :param x_start: [B, M, H, W] clean mask in diffusion space: the target.
        :param t: LongTensor [B] of levels (from a schedule sampler).
        :param noise: optional [B, M, H, W] noise (drawn with the global RNG otherwise).
        :param noised_start: optional [B, M, H, W] mask in diffusion space that is noised in
            place of ``x_start`` (pre-segmentation-aware training, an extension beyond the
            paper): ``x_t = q_sample(noised_start, t)`` while the target stays ``x_start``.
        :return: dict of [B] tensors: ``mse`` (MSE of the mask prediction, eps or x0, over the
            mask channels), ``vb`` (only with learn_sigma) and ``loss = mse (+ vb)``.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        source = x_start if noised_start is None else noised_start
        x_t = self.q_sample(source, t, noise=noise)
        output = model(build_model_input(image, x_t), self.scale_timesteps(t))
        prediction, v = self._split_output(output, x_t)
        terms = {"mse": mean_flat((self._training_target(x_start, x_t, t, noise, noised_start) - prediction) ** 2)}
        if self.learn_sigma:
            # The vb term trains only the variance: the mask prediction is frozen so that the
            # bound's weighting does not pull on the mean (improved-diffusion, sec. 3.1).
            frozen = torch.cat([prediction.detach(), v], dim=1)
            vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.rescale_learned_sigmas:
                # improved-diffusion's RESCALED_MSE: keeps vb from swamping the MSE term.
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
            terms["loss"] = terms["mse"] + vb
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _training_target(self, x_start, x_t, t, noise, noised_start):
        """What the mask channels must predict so that the sampler's x0 estimate is the label.

        x0 itself with predict_xstart. For an eps model the plain target is the noise; when
        x_t was noised from another mask (the pre-segmentation), it is the eps that explains
        x_t from the label, ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``, so that
        ``pred_xstart`` is still the label. That eps carries the pre-segmentation's error
        scaled by ``sqrt(abar_t / (1 - abar_t))`` (about 2.4 at t = 250 of the cosine chain,
        and unbounded as t -> 0), which is why pre-segmentation-aware training is best run
        with --predict_xstart True: its target stays within the mask's range at every level.
        """
        if self.predict_xstart:
            return x_start
        if noised_start is None:
            return noise
        c = self._pair(t, t - 1, x_t)
        return (x_t - c.sqrt_abar_t * x_start) / c.sqrt_one_minus_abar_t
