"""Timestep samplers for training (improved-diffusion's ``resample.py``).

A sampler draws levels t with probability p(t) and returns importance weights
``1 / (N p(t))`` so that the weighted loss stays an unbiased estimate of the uniform one.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

from guided_diffusion.errors import ConfigError

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion):
    """Build a sampler by its ``--schedule_sampler`` name."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ConfigError(
        f"--schedule_sampler: unknown sampler {name!r} (choose one of {', '.join(SCHEDULE_SAMPLERS)})"
    )


class ScheduleSampler(ABC):
    """A distribution over the N levels of a diffusion, with importance weights."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised, positive probabilities per level: float64 [N]."""

    def sample(self, batch_size: int, device, generator=None):
        """Draw ``batch_size`` levels.

        :param device: where the returned tensors live.
        :param generator: optional ``torch.Generator`` (CPU or on ``device``) for reproducible draws.
        :return: (t LongTensor [batch_size], weights FloatTensor [batch_size]) on ``device``.
        """
        w = self.weights()
        draw_device = generator.device if generator is not None else torch.device("cpu")
        # MPS has no float64; everywhere else keep the probabilities exact.
        dtype = torch.float32 if draw_device.type == "mps" else torch.float64
        p = torch.as_tensor(w / np.sum(w), dtype=dtype, device=draw_device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (p.shape[0] * p[t])
        return t.to(device=device, dtype=torch.long), weights.to(device=device, dtype=torch.float32)


class UniformSampler(ScheduleSampler):
    """p(t) = 1 / N; every weight is 1."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

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

    Uniform until every level has a full history (Nichol & Dhariwal, sec. 3.3); afterwards a
    ``uniform_prob`` share stays uniform so that no level is starved.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        n = diffusion.num_timesteps
        self._loss_history = np.zeros([n, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([n], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1.0 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # Full history: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
