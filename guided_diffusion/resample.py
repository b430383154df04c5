"""Timestep samplers for training (improved-diffusion's ``resample.py``), and the training window.

A sampler draws levels t from its support (the whole chain ``0 .. N-1``, or a window
``[lo, hi]``) with probability p(t) and returns importance weights ``1 / (W p(t))`` (W levels
in the support) so that the weighted loss stays an unbiased estimate of the uniform loss over
that support.

Training where ADDPM samples (an extension beyond the paper): the truncated sampler only asks
the UNet about levels ``T .. pre_t``, so ``--t_range LO,HI`` trains on that window alone, and
``--t_range_mix F`` keeps a fraction F of every batch on the whole chain (uniform there, weight
1) so that the full-chain samplers (ddpm, ddim) remain possible. ``WindowMixture`` does the
split; the window's own sampler may be uniform or loss-aware.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

from guided_diffusion.errors import ConfigError

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def parse_t_range(text, num_timesteps: int) -> tuple[int, int] | None:
    """``"250,300"`` -> ``(250, 300)``, checked against the chain; empty -> None (whole chain)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = list(text)
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--t_range {text!r}: expected two integers LO,HI, e.g. 250,300") from None
    if not 0 <= lo <= hi < num_timesteps:
        raise ConfigError(
            f"--t_range {text!r}: expected 0 <= LO <= HI < diffusion_steps ({num_timesteps})"
        )
    return lo, hi


def create_named_schedule_sampler(name: str, diffusion, *, t_range=None, t_range_mix: float = 0.0):
    """Build a sampler by its ``--schedule_sampler`` name.

    :param t_range: None (the whole chain) or ``(lo, hi)``: the sampler's support is then the
        window ``lo .. hi`` and, with ``t_range_mix`` F > 0, a ``WindowMixture`` sends a fraction
        F of every batch to the whole chain.
    """
    if not 0.0 <= t_range_mix <= 1.0:
        raise ConfigError(f"--t_range_mix must lie in [0, 1], got {t_range_mix}")
    levels = None if t_range is None else np.arange(t_range[0], t_range[1] + 1)
    if name == "uniform":
        sampler = UniformSampler(diffusion, levels=levels)
    elif name == "loss-second-moment":
        sampler = LossSecondMomentResampler(diffusion, levels=levels)
    else:
        raise ConfigError(
            f"--schedule_sampler: unknown sampler {name!r} (choose one of {', '.join(SCHEDULE_SAMPLERS)})"
        )
    if t_range is None or t_range_mix == 0.0:
        return sampler
    return WindowMixture(sampler, UniformSampler(diffusion), t_range_mix)


def _support(diffusion, levels) -> np.ndarray:
    if levels is None:
        return np.arange(diffusion.num_timesteps)
    return np.asarray(levels, dtype=np.int64)


class ScheduleSampler(ABC):
    """A distribution over a support of levels (``self.levels``), with importance weights."""

    levels: np.ndarray

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised, positive probabilities per level of the support: float64 [W]."""

    def sample(self, batch_size: int, device, generator=None):
        """Draw ``batch_size`` levels.

        :param device: where the returned tensors live.
        :param generator: optional ``torch.Generator`` (CPU or on ``device``) for reproducible draws.
        :return: (t LongTensor [batch_size], weights FloatTensor [batch_size]) on ``device``.
        """
        if batch_size == 0:
            return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device)
        w = self.weights()
        draw_device = generator.device if generator is not None else torch.device("cpu")
        # MPS has no float64; everywhere else keep the probabilities exact.
        dtype = torch.float32 if draw_device.type == "mps" else torch.float64
        p = torch.as_tensor(w / np.sum(w), dtype=dtype, device=draw_device)
        index = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (p.shape[0] * p[index])
        t = torch.as_tensor(self.levels, device=draw_device)[index]
        return t.to(device=device, dtype=torch.long), weights.to(device=device, dtype=torch.float32)

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this process's per-sample losses; a no-op for samplers that do not adapt."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the sampler (tensors and numbers); empty if it has no state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""


class UniformSampler(ScheduleSampler):
    """p(t) = 1 / W over the support; every weight is 1."""

    def __init__(self, diffusion, levels=None):
        self.diffusion = diffusion
        self.levels = _support(diffusion, levels)
        self._weights = np.ones([len(self.levels)], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts p(t) to the losses seen so far."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this process's per-sample losses (all processes' under torch.distributed).

        Every rank must call this with its own batch so that all ranks keep identical
        histories and therefore draw from the same distribution. Without a process group
        the local losses are used as they are.

        :param local_ts: LongTensor [b] of levels; ``local_losses``: tensor [b].
        """
        if dist.is_available() and dist.is_initialized():
            ts, losses = self._all_gather(local_ts, local_losses)
        else:
            ts = local_ts.detach().cpu().tolist()
            losses = local_losses.detach().float().cpu().tolist()
        self.update_with_all_losses(ts, losses)

    @staticmethod
    def _all_gather(local_ts, local_losses):
        world = dist.get_world_size()
        device = local_ts.device
        size = torch.tensor([local_ts.shape[0]], dtype=torch.long, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        # all_gather needs equal shapes: pad every rank's batch to the longest one.
        ts_pad = torch.zeros(longest, dtype=torch.long, device=device)
        loss_pad = torch.zeros(longest, dtype=torch.float32, device=device)
        ts_pad[: local_ts.shape[0]] = local_ts.detach().long()
        loss_pad[: local_losses.shape[0]] = local_losses.detach().float()
        ts_all = [torch.zeros_like(ts_pad) for _ in range(world)]
        loss_all = [torch.zeros_like(loss_pad) for _ in range(world)]
        dist.all_gather(ts_all, ts_pad)
        dist.all_gather(loss_all, loss_pad)
        ts = [x for part, n in zip(ts_all, sizes) for x in part[:n].cpu().tolist()]
        losses = [x for part, n in zip(loss_all, sizes) for x in part[:n].cpu().tolist()]
        return ts, losses

    @abstractmethod
    def update_with_all_losses(self, ts, losses) -> None:
        """Record the losses of every process: ``ts`` list[int], ``losses`` list[float]."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last ``history_per_term`` losses.

    Uniform until every level of the support has a full history (Nichol & Dhariwal, sec. 3.3);
    afterwards a ``uniform_prob`` share stays uniform so that no level is starved. Losses of
    levels outside the support (the whole-chain share of a ``WindowMixture``) are not recorded.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001, levels=None):
        self.diffusion = diffusion
        self.levels = _support(diffusion, levels)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        n = len(self.levels)
        self._loss_history = np.zeros([n, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([n], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([len(self.levels)], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1.0 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses) -> None:
        first, count = int(self.levels[0]), len(self.levels)
        for t, loss in zip(ts, losses):
            t = int(t) - first  # the support is a contiguous range of levels
            if not 0 <= t < count:
                continue
            if self._loss_counts[t] == self.history_per_term:
                # Full history: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        return {
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "_loss_history": torch.from_numpy(self._loss_history.copy()),
            "_loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        history = state["_loss_history"].numpy().astype(np.float64)
        if history.shape != self._loss_history.shape:
            raise ConfigError(
                f"the saved loss history covers {history.shape[0]} levels, this run's sampler "
                f"{self._loss_history.shape[0]}: were --t_range or --diffusion_steps changed?"
            )
        self.history_per_term = int(state["history_per_term"])
        self.uniform_prob = float(state["uniform_prob"])
        self._loss_history = history
        self._loss_counts = state["_loss_counts"].numpy().astype(np.int64)


class WindowMixture(ScheduleSampler):
    """A window sampler for most of each batch and the uniform whole chain for a fraction of it.

    Of a batch of n, ``floor(mix * n + u)`` examples (u uniform in [0, 1), so the share is
    exactly ``mix`` on average, also for microbatches of one) take a uniform level of the whole
    chain with weight 1; the others come from ``window`` with its own weights. Both parts are
    plain averages of their losses, so the run trains on the window's loss plus a ``mix``
    share of the whole chain's.
    """

    def __init__(self, window: ScheduleSampler, whole_chain: ScheduleSampler, mix: float):
        self.window = window
        self.whole_chain = whole_chain
        self.mix = float(mix)
        self.levels = whole_chain.levels

    def weights(self) -> np.ndarray:
        """The mean probability per level of the whole chain (for inspection)."""
        window = np.zeros(len(self.levels))
        w = self.window.weights()
        window[self.window.levels] = w / w.sum()
        return (1.0 - self.mix) * window + self.mix / len(self.levels)

    def sample(self, batch_size: int, device, generator=None):
        draw_device = generator.device if generator is not None else torch.device("cpu")
        u = float(torch.rand((), generator=generator, device=draw_device))
        n_whole = min(int(np.floor(self.mix * batch_size + u)), batch_size)
        t_window, w_window = self.window.sample(batch_size - n_whole, device, generator=generator)
        t_whole, w_whole = self.whole_chain.sample(n_whole, device, generator=generator)
        return torch.cat([t_window, t_whole]), torch.cat([w_window, w_whole])

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        self.window.update_with_local_losses(local_ts, local_losses)

    def state_dict(self) -> dict:
        return self.window.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state)
