"""The training loop of the conditional diffusion UNet (improved-diffusion's ``TrainLoop``, slim).

One step takes one global batch: ``batch_size`` examples on each of ``world_size`` processes
(global batch = ``batch_size * world_size`` under torchrun), split into microbatches whose
gradients accumulate, so that every microbatch counts and the update equals that of the whole
batch at once. Around it: AdamW, EMA copies at several rates, linear learning-rate annealing,
gradient clipping, mixed precision through ``torch.autocast`` (a grad scaler for fp16),
uniform or loss-aware timestep sampling, interval logging (loss by timestep quartile as
improved-diffusion logs it), self-describing checkpoints, and bit-identical resume.

Determinism: everything random in a step is a pure function of ``(seed, step, rank)`` and the
data order a pure function of ``(seed, sample position)``:

- the data stream is the concatenation of per-epoch permutations of the dataset, each seeded by
  ``(seed, epoch)``; global step ``s`` consumes stream positions ``[p, p + G)`` where ``p`` counts
  the samples seen so far and ``G`` is the global batch, and rank ``r`` takes its ``r``-th slice
  of ``batch_size`` (``StepBatchSampler``). Resuming jumps to ``p`` by arithmetic, loading nothing;
- the timesteps and noise of step ``s`` come from a generator seeded by ``(seed, step, rank)``,
  and the global torch RNG (dropout, augmentation in the main process) is reseeded likewise;
- a checkpoint stores the model, EMA, optimizer, grad scaler, timestep-sampler state, step and
  sample position, so 2 steps + resume + 2 steps equals 4 steps bit for bit (same device,
  precision and world size). Resuming with another world size continues the same data stream
  at the same sample position, but the per-rank noise differs.

Data augmentation (``--augment``) draws from torch's global RNG: with ``num_workers 0`` that is
the per-step reseeded one above, so it too repeats on resume. DataLoader workers have their own
RNG, seeded from ``(seed, first step of the run)`` when the loader starts: a run is repeatable,
but a resumed run augments differently from an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import blobfile as bf
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from guided_diffusion import checkpoint, dist_util, logger
from guided_diffusion.errors import AddpmError, CheckpointError, ConfigError
from guided_diffusion.mask_space import hard_channels, label_channels, to_diffusion_space
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.run_dir import BEST_NAME, checkpoint_path, final_is_current, mix_seed, prune_checkpoints

CHECKPOINT_KIND = "diffusion"


def parse_ema_rates(ema_rate: str | float | Sequence[float]) -> list[str]:
    """``"0.9999,0.999"`` -> ``["0.9999", "0.999"]`` (the keys of ``ckpt["ema"]``), checked."""
    if isinstance(ema_rate, (int, float)):
        tokens = [repr(float(ema_rate))]
    elif isinstance(ema_rate, str):
        tokens = [tok.strip() for tok in ema_rate.split(",") if tok.strip()]
    else:
        tokens = [repr(float(r)) for r in ema_rate]
    for tok in tokens:
        try:
            value = float(tok)
        except ValueError:
            raise ConfigError(f"--ema_rate {ema_rate!r}: {tok!r} is not a number") from None
        if not 0.0 < value < 1.0:
            raise ConfigError(f"--ema_rate {ema_rate!r}: every rate must lie in (0, 1), got {tok}")
    if len({float(t) for t in tokens}) != len(tokens):
        raise ConfigError(f"--ema_rate {ema_rate!r} names a rate twice")
    return tokens


class StepBatchSampler(Sampler):
    """An endless stream of index batches for one rank, a pure function of the seed and position.

    Global sample position ``q`` maps to ``perm_e[q % n]`` with ``e = q // n`` and ``perm_e`` a
    permutation of ``range(n)`` seeded by ``(seed, e)``. Each global step takes ``global_batch``
    consecutive positions; rank ``r`` takes positions ``[r*B, (r+1)*B)`` of them. A dataset
    smaller than a global batch is fine: batches run across epoch boundaries.

    Args:
        num_items: dataset length n.
        batch_size: per-rank batch B.
        rank, world_size: this process and the number of processes.
        seed: the run's seed.
        start_position: global sample position of the first batch (samples seen so far).
        shuffle: False keeps the dataset order (every epoch the same).
    """

    def __init__(self, num_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_position: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ConfigError("the training dataset is empty")
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_position = start_position
        self.shuffle = shuffle

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_position
        cache: dict[int, np.ndarray] = {}
        while True:
            first = position + self.rank * self.batch_size
            batch = []
            for q in range(first, first + self.batch_size):
                epoch, offset = divmod(q, self.num_items)
                if epoch not in cache:
                    # Only the epochs a batch touches are kept: at most two at a time.
                    cache = {e: p for e, p in cache.items() if e >= epoch - 1}
                    cache[epoch] = self._permutation(epoch)
                batch.append(int(cache[epoch][offset]))
            yield batch
            position += self.global_batch


def log_loss_dict(num_timesteps: int, ts: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
    """Log each loss's mean and its mean per timestep quartile (``loss_q0`` .. ``loss_q3``)."""
    ts_cpu = ts.detach().cpu().numpy()
    for key, values in losses.items():
        values_cpu = values.detach().float().cpu().numpy()
        logger.logkv_mean(key, float(values_cpu.mean()))
        for sub_t, sub_loss in zip(ts_cpu, values_cpu):
            quartile = int(4 * sub_t / num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", float(sub_loss))


class TrainLoop:
    """Trains ``model`` on ``dataset`` with ``diffusion.training_losses``.

    Args (keyword-only):
        model: the conditional UNet (unwrapped; DDP wrapping happens here).
        diffusion: a ``GaussianDiffusion``.
        dataset: items ``{"image": [C,S,S] float, "label": [S,S] or [K,S,S] long in {0,1}, ...}``
            (one mask channel, or one per class or region: the model's mask channels).
        collate_fn: turns a list of items into ``{"image": [B,C,S,S], "label": [B,(K,)S,S], ...}``.
        config: the checkpoint config (plain python types), saved with every checkpoint.
        out_dir: checkpoints and logs; rank 0 writes.
        ctx: the ``dist_util.DistContext`` of this process.
        batch_size: per-process batch; the global batch is ``batch_size * world_size``.
        microbatch: examples per forward/backward pass (-1 or 0: the whole batch).
        lr, weight_decay: AdamW.
        ema_rate: ``"0.9999,0.999"`` or a float.
        lr_anneal_steps: > 0: the lr falls linearly to 0 over this many steps and the run ends there.
        max_steps: > 0: the run ends when the step counter reaches it (a resumed run continues
            counting, so this is the total). With both 0 the run goes on until stopped.
        grad_clip: max global grad norm (0: no clipping; the norm is logged either way).
        precision: fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler).
        schedule_sampler: "uniform" | "loss-second-moment".
        t_range: None (every level of the chain) or (lo, hi): train on the levels lo..hi only,
            where the truncated sampler walks (an extension beyond the paper).
        t_range_mix: with t_range, the fraction of every batch drawn from the whole chain.
        preseg_fn: None, or ``f(batch) -> [B, K, S, S]`` per-channel probabilities of the
            pre-segmentation of the batch's images (on this device). With it, a
            ``preseg_fraction`` share of every batch is noised from the pre-segmentation
            instead of the label, the label staying the target (pre-segmentation-aware
            training, an extension beyond the paper).
        preseg_fraction: that share, in [0, 1].
        exclusive: the mask channels are exclusive classes (the pre-segmentation's most probable
            class is noised) or overlapping regions (each channel thresholded), ``hard_channels``.
        validator: None, or ``f(model) -> dict`` of validation scores with the key
            ``"val_score"`` (higher is better); called every ``val_interval`` steps and at
            the end with the first EMA's weights in the model, in eval mode. The best score's
            weights are kept as ``best.pt``.
        val_interval: steps between validations (0: never).
        log_interval, save_interval: in steps.
        keep_checkpoints: how many ``diffusion_<step>.pt`` to keep (``final.pt`` is kept besides).
        resume_checkpoint: a checkpoint path to continue from ("" for none).
        mask_space: how {0,1} labels map into diffusion space ("pm1" | "01").
        seed: the run's seed (data order, timesteps, noise); a resumed run keeps its checkpoint's.
        num_workers: DataLoader workers.
        progress: show a tqdm bar on rank 0.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion,
        dataset: Dataset,
        collate_fn: Callable | None,
        config: dict,
        out_dir: str,
        ctx: dist_util.DistContext,
        batch_size: int,
        microbatch: int = -1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        ema_rate: str | float = "0.9999",
        lr_anneal_steps: int = 0,
        max_steps: int = 0,
        grad_clip: float = 1.0,
        precision: str = "fp32",
        schedule_sampler: str = "uniform",
        t_range: tuple[int, int] | None = None,
        t_range_mix: float = 0.0,
        preseg_fn: Callable[[dict], torch.Tensor] | None = None,
        preseg_fraction: float = 0.0,
        exclusive: bool = True,
        validator: Callable[[torch.nn.Module], dict] | None = None,
        val_interval: int = 0,
        log_interval: int = 10,
        save_interval: int = 10000,
        keep_checkpoints: int = 3,
        resume_checkpoint: str = "",
        mask_space: str = "pm1",
        seed: int = 0,
        num_workers: int = 0,
        progress: bool = True,
    ):
        _check_settings(batch_size=batch_size, microbatch=microbatch, lr=lr, lr_anneal_steps=lr_anneal_steps,
                        max_steps=max_steps, num_workers=num_workers, log_interval=log_interval,
                        save_interval=save_interval, keep_checkpoints=keep_checkpoints, grad_clip=grad_clip,
                        preseg_fraction=preseg_fraction, val_interval=val_interval)
        self.ctx = ctx
        self.device = ctx.device
        self.model = model.to(self.device)
        self.diffusion = diffusion
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.config = config
        self.out_dir = out_dir
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.ema_rates = parse_ema_rates(ema_rate)
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.grad_clip = grad_clip
        self.precision = precision
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.keep_checkpoints = keep_checkpoints
        self.mask_space = mask_space
        self.seed = seed
        self.num_workers = num_workers
        self.progress = progress

        # Built once here so that a precision the device cannot run fails before training.
        dist_util.autocast_context(self.device, precision)
        self.scaler = dist_util.make_grad_scaler(self.device, precision)
        self.schedule_sampler = create_named_schedule_sampler(
            schedule_sampler, diffusion, t_range=t_range, t_range_mix=t_range_mix
        )
        self.preseg_fn = preseg_fn
        self.preseg_fraction = preseg_fraction if preseg_fn is not None else 0.0
        self.exclusive = exclusive
        self.validator = validator
        self.val_interval = val_interval if validator is not None else 0
        self.best_val_score: float | None = None
        self.best_step: int | None = None

        self._init_state(resume_checkpoint)

    def _init_state(self, resume_checkpoint: str) -> None:
        """Optimizer, EMA copies, step and data position: fresh, or those of the checkpoint."""
        self.params = [p for p in self.model.parameters()]
        self.param_names = [name for name, _ in self.model.named_parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]

        self.step = 0
        self.samples_seen = 0
        self.last_checkpoint = ""
        if resume_checkpoint:
            self._load(resume_checkpoint)

        self.ddp_model = dist_util.wrap_model(self.model, self.ctx)
        self.sampler = StepBatchSampler(
            len(self.dataset), self.batch_size, rank=self.ctx.rank, world_size=self.ctx.world_size,
            seed=self.seed, start_position=self.samples_seen,
        )

    # ----------------------------------------------------------------------------- schedule

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.ctx.world_size

    @property
    def total_steps(self) -> int | None:
        """The step at which the run ends (None: never)."""
        ends = [s for s in (self.max_steps, self.lr_anneal_steps) if s > 0]
        return min(ends) if ends else None

    def current_lr(self) -> float:
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * (1.0 - self.step / self.lr_anneal_steps)

    # ----------------------------------------------------------------------------- running

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, self.step, 2)),
        )

    def run(self) -> str:
        """Train until the end step (or forever); returns the final checkpoint's path.

        Raises ``AddpmError`` for a non-finite loss, naming the last good checkpoint.
        """
        total = self.total_steps
        if total is not None and self.step >= total:
            logger.log(f"step {self.step} already reaches the end step {total}: nothing to train")
            # A kill while final.pt was written leaves the run without it: write it again.
            if not final_is_current(self.out_dir, self.step, CHECKPOINT_KIND):
                self.save(final=True)
            return self.last_checkpoint
        logger.log(
            f"training from step {self.step}"
            + (f" to {total}" if total is not None else " until stopped")
            + f"; global batch {self.global_batch} = {self.batch_size} x {self.ctx.world_size} process(es)"
        )
        bar = None
        if self.progress and self.ctx.is_main:
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        start_step = self.step
        interval_start = time.perf_counter()
        interval_samples = 0
        data = iter(self._loader())
        try:
            while total is None or self.step < total:
                torch.manual_seed(mix_seed(self.seed, self.step, self.ctx.rank, 1))
                batch = next(data)
                stats = self.run_step(batch)
                interval_samples += self.global_batch
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
                validated = bool(self.val_interval) and self.step % self.val_interval == 0
                if validated:
                    # The validation's time is left out of the interval's samples per second.
                    started = time.perf_counter()
                    self.validate()
                    interval_start += time.perf_counter() - started
                # A validation row is dumped at its own step, with the interval's training means.
                if self.step % self.log_interval == 0 or validated:
                    self._dump(interval_samples, interval_start)
                    interval_start, interval_samples = time.perf_counter(), 0
                if self.step % self.save_interval == 0:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            del data
        if self.step > start_step:
            validate_last = self.val_interval and self.step % self.val_interval != 0
            if validate_last:
                self.validate()
            if interval_samples:
                self._dump(interval_samples, interval_start)
            elif validate_last:
                logger.dumpkvs()
            logger.draw_curves()
            # Checked before the final save, so that a diverged run leaves no final.pt.
            self.check_consistent_across_ranks()
            self.save(final=True)
        return self.last_checkpoint

    @staticmethod
    def _dump(samples: int, since: float) -> None:
        logger.logkv("samples_per_sec", samples / max(time.perf_counter() - since, 1e-9))
        logger.dumpkvs()

    def run_step(self, batch: dict) -> dict:
        """One optimisation step on this rank's batch; returns the logged scalars of the step."""
        image = batch["image"].to(self.device, non_blocking=True)
        x_start = to_diffusion_space(label_channels(batch["label"].to(self.device)), self.mask_space)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(mix_seed(self.seed, self.step, self.ctx.rank, 0))
        noised_start = self._noised_start(batch, x_start, generator) if self.preseg_fraction > 0 else None

        for group in self.opt.param_groups:
            group["lr"] = self.current_lr()
        self.opt.zero_grad(set_to_none=True)
        size = image.shape[0]
        loss_sum = torch.zeros((), device=self.device)
        for start in range(0, size, self.microbatch):
            micro_image = image[start:start + self.microbatch]
            micro_x = x_start[start:start + self.microbatch]
            micro_noised = None if noised_start is None else noised_start[start:start + self.microbatch]
            n = micro_image.shape[0]
            t, weights = self.schedule_sampler.sample(n, self.device, generator=generator)
            noise = torch.randn(micro_x.shape, generator=generator, device=self.device, dtype=micro_x.dtype)
            last = start + self.microbatch >= size
            # DDP all-reduces gradients on every backward unless told not to: only the last
            # microbatch of the step needs to.
            sync = self.ddp_model.no_sync() if (self.ctx.is_distributed and not last) else nullcontext()
            with sync:
                with dist_util.autocast_context(self.device, self.precision):
                    losses = self.diffusion.training_losses(
                        self.ddp_model, micro_image, micro_x, t, noise=noise, noised_start=micro_noised
                    )
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                # Sum over the microbatch divided by the whole batch: the accumulated gradient is
                # that of the batch mean, whatever the microbatch split.
                loss = (losses["loss"].float() * weights).sum() / size
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            log_loss_dict(self.diffusion.num_timesteps, t, {k: v * weights for k, v in losses.items()})

        self._check_finite(loss_sum)
        self.scaler.unscale_(self.opt)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.opt)
        self.scaler.update()
        # fp16: the scaler skips a step whose gradients overflowed; the EMA skips it too.
        if not self.scaler.is_enabled() or self.scaler.get_scale() >= scale_before:
            self._update_ema()
        self.step += 1
        self.samples_seen += self.global_batch

        stats = {"loss": float(loss_sum), "grad_norm": float(grad_norm), "lr": self.opt.param_groups[0]["lr"]}
        logger.logkv_mean("grad_norm", stats["grad_norm"])
        logger.logkv("lr", stats["lr"])
        logger.logkv("step", self.step)
        logger.logkv("samples", self.samples_seen)
        if self.scaler.is_enabled():
            logger.logkv("loss_scale", self.scaler.get_scale())
        return stats

    @torch.no_grad()
    def _noised_start(self, batch: dict, x_start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The masks that the batch's x_t are noised from: the pre-segmentation for a
        ``preseg_fraction`` share of the examples (``floor(F * B + u)`` of them, u uniform, at
        random positions), the label for the rest."""
        size = x_start.shape[0]
        u = float(torch.rand((), generator=generator, device=self.device))
        count = min(int(math.floor(self.preseg_fraction * size + u)), size)
        chosen = torch.randperm(size, generator=generator, device=self.device)[:count]
        noised = x_start.clone()
        if count:
            probs = self.preseg_fn({k: _take(v, chosen) for k, v in batch.items()})
            preseg = hard_channels(probs.float(), self.exclusive)
            noised[chosen] = to_diffusion_space(preseg, self.mask_space)
            label = label_channels(batch["label"].to(self.device)[chosen])
            # How good the pre-segmentation is on training images: if far better than on
            # validation images, the UNet sees fewer of its errors here than it must correct.
            logger.logkv_mean("train_preseg_dice", float(_dice(preseg, label)))
        logger.logkv_mean("preseg_share", count / size)
        return noised

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Stop every rank on a non-finite loss before it reaches the weights."""
        bad = (~torch.isfinite(loss_sum)).to(torch.float32).reshape(1)
        if self.ctx.is_distributed:
            dist.all_reduce(bad)
        if bad.item() > 0:
            last = self.last_checkpoint or "none (no checkpoint was written in this run)"
            raise AddpmError(f"non-finite loss at step {self.step + 1}; last good checkpoint: {last}")

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up: the effective rate min(rate, (1 + n) / (10 + n)) after n updates lets a short
        # run's average forget the random initial weights; after a few thousand steps it is the
        # plain rate, as in improved-diffusion.
        warmup = (1.0 + self.step) / (10.0 + self.step)
        for rate, ema in zip(self.ema_rates, self.ema_params):
            weight = 1.0 - min(float(rate), warmup)
            for target, source in zip(ema, self.params):
                target.lerp_(source.detach(), weight)

    def validate(self) -> dict:
        """Score the first EMA's weights with ``validator``; keep ``best.pt`` on a new best."""
        start = time.perf_counter()
        backup = [p.detach().clone() for p in self.params]
        was_training = self.model.training
        with torch.no_grad():
            for p, ema in zip(self.params, self.ema_params[0]):
                p.copy_(ema)
        self.model.eval()
        try:
            scores = self.validator(self.model)
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, backup):
                    p.copy_(saved)
            self.model.train(was_training)
        score = float(scores["val_score"])
        improved = math.isfinite(score) and (self.best_val_score is None or score > self.best_val_score)
        if improved:
            self.best_val_score, self.best_step = score, self.step
        for key, value in scores.items():
            logger.logkv(key, value)
        logger.logkv("step", self.step)
        logger.logkv("val_seconds", time.perf_counter() - start)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))
        if improved:
            best = "new best"
        elif self.best_val_score is None:
            best = "no best yet: the score is undefined"
        else:
            best = f"best {self.best_val_score:.4f} at step {self.best_step}"
        logger.log(f"step {self.step}: validation {shown} ({best}; {time.perf_counter() - start:.0f} s)")
        if improved:
            self.save(name=BEST_NAME)
        return scores

    # ----------------------------------------------------------------------------- state

    def ema_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The model's state dict with the parameters of the ``index``-th EMA in place."""
        state = {k: v.detach().clone() for k, v in checkpoint.unwrap_model(self.model).state_dict().items()}
        for name, value in zip(self.param_names, self.ema_params[index]):
            state[name] = value.detach().clone()
        return state

    def _extra_state(self) -> dict:
        extra = {
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "world_size": self.ctx.world_size,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        }
        sampler_state = self.schedule_sampler.state_dict()
        if sampler_state:
            extra["schedule_sampler"] = sampler_state
        if self.best_step is not None:
            extra.update(best_val_score=self.best_val_score, best_step=self.best_step)
        return extra

    def save(self, final: bool = False, name: str | None = None) -> str:
        """Write ``diffusion_<step>.pt`` (``final.pt`` when final, ``name`` when given) on rank 0
        and prune old numbered files. Every file holds the whole training state."""
        if name is not None or final:
            path = bf.join(self.out_dir, name or checkpoint.FINAL_NAME)
        else:
            path = checkpoint_path(self.out_dir, CHECKPOINT_KIND, self.step)
        if self.ctx.is_main:
            checkpoint.save_checkpoint(
                path,
                kind=CHECKPOINT_KIND,
                model_state=checkpoint.unwrap_model(self.model).state_dict(),
                config=self.config,
                ema={rate: self.ema_state_dict(i) for i, rate in enumerate(self.ema_rates)},
                optimizer=self.opt.state_dict(),
                step=self.step,
                extra=self._extra_state(),
            )
            logger.log(f"saved {path} (step {self.step})")
            prune_checkpoints(self.out_dir, CHECKPOINT_KIND, self.keep_checkpoints)
        if name != BEST_NAME:
            self.last_checkpoint = path
        return path

    def _load(self, path: str) -> None:
        ckpt = checkpoint.load_checkpoint(path, kind=CHECKPOINT_KIND, map_location=self.device)
        _check_same_setup(path, ckpt.get("config") or {}, self.config)
        checkpoint.load_weights(self.model, ckpt["model"], source=path)
        saved_ema = ckpt.get("ema") or {}
        by_value = {float(k): v for k, v in saved_ema.items()}
        for rate, ema in zip(self.ema_rates, self.ema_params):
            state = by_value.get(float(rate))
            if state is None:
                logger.log(f"{path} has no EMA at rate {rate}: it starts from the model's weights")
                for dst, src in zip(ema, self.params):
                    dst.copy_(src.detach())
                continue
            missing = [n for n in self.param_names if n not in state]
            if missing:
                raise CheckpointError(f"{path}: EMA {rate} lacks parameter {missing[0]}")
            for name, dst in zip(self.param_names, ema):
                dst.copy_(state[name])
        if ckpt.get("optimizer"):
            try:
                self.opt.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: optimizer state does not fit this model ({err})") from None
            # The flags of this run win over the hyperparameters stored with the optimizer state.
            for group in self.opt.param_groups:
                group["weight_decay"] = self.weight_decay
        extra = ckpt.get("extra") or {}
        if self.scaler.is_enabled() and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if extra.get("schedule_sampler"):
            try:
                self.schedule_sampler.load_state_dict(extra["schedule_sampler"])
            except ConfigError as err:
                raise ConfigError(f"--resume: {path}: {err}") from None
        if extra.get("best_step") is not None:
            self.best_val_score, self.best_step = float(extra["best_val_score"]), int(extra["best_step"])
        self.step = int(ckpt.get("step") or 0)
        self.samples_seen = int(extra.get("samples_seen", self.step * self.global_batch))
        # The seed is the run's RNG state (data order, noise): the resumed run keeps it.
        saved_seed = extra.get("seed")
        if saved_seed is not None and int(saved_seed) != self.seed:
            logger.log(f"--seed {self.seed} ignored: the run continues with its checkpoint's seed {saved_seed}")
            self.seed = int(saved_seed)
        self.last_checkpoint = path
        if extra.get("world_size", self.ctx.world_size) != self.ctx.world_size:
            logger.log(
                f"{path} was trained on {extra['world_size']} process(es), this run has "
                f"{self.ctx.world_size}: the data continues at sample {self.samples_seen}, the noise differs"
            )
        logger.log(f"resumed from {path} at step {self.step}")

    def check_consistent_across_ranks(self) -> str:
        """Verify that every rank ends with the same weights; returns their digest ("" for one process).

        DDP keeps replicas equal only if every rank did the same updates; a difference means a
        bug or a hardware fault, so it raises rather than saving a silently diverged model.
        """
        if not self.ctx.is_distributed:
            return ""
        digest = parameter_digest(self.params)
        mine = torch.tensor(np.frombuffer(bytes.fromhex(digest)[:8], dtype=np.int64).copy(), device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(
                f"model parameters differ across the {self.ctx.world_size} ranks at step {self.step}"
            )
        logger.log(f"parameters consistent across {self.ctx.world_size} ranks (sha256 {digest[:16]})")
        return digest


def _check_settings(*, batch_size, microbatch, lr, lr_anneal_steps, max_steps, num_workers, log_interval,
                    save_interval, keep_checkpoints, grad_clip, preseg_fraction, val_interval) -> None:
    """ConfigError (one line naming the flag) for a value the loop cannot use."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    if microbatch > batch_size:
        raise ConfigError(f"--microbatch {microbatch} is larger than --batch_size {batch_size}")
    for flag, value in (("--lr_anneal_steps", lr_anneal_steps), ("--max_steps", max_steps),
                        ("--num_workers", num_workers)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--log_interval", log_interval), ("--save_interval", save_interval),
                        ("--keep_checkpoints", keep_checkpoints)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"--lr must be a finite number >= 0, got {lr}")
    if grad_clip < 0:
        raise ConfigError(f"--grad_clip must be >= 0 (0 turns clipping off), got {grad_clip}")
    if not 0.0 <= preseg_fraction <= 1.0:
        raise ConfigError(f"--preseg_fraction must lie in [0, 1], got {preseg_fraction}")
    if val_interval < 0:
        raise ConfigError(f"--val_interval must be >= 0, got {val_interval}")


def parameter_digest(params: Sequence[torch.Tensor]) -> str:
    """sha256 of the parameters' bytes (exact equality test across processes)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_same_setup(path: str, saved: dict, current: dict) -> None:
    """A resumed run must build the same model and diffusion as the checkpoint's."""
    for key in ("image_size", "image_channels", "mask_channels"):
        if key in saved and key in current and saved[key] != current[key]:
            raise ConfigError(f"--resume: {path} has {key}={saved[key]}, this run has {current[key]}")
    for group in ("model", "diffusion", "preprocess", "training"):
        old, new = saved.get(group) or {}, current.get(group) or {}
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key]:
                raise ConfigError(
                    f"--resume: {path} was trained with --{key} {old[key]}, this run has --{key} {new[key]}"
                )


def _take(value, index: torch.Tensor):
    """Rows ``index`` of one batch entry (a tensor, or a list such as case ids and metas)."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    return [value[i] for i in index.tolist()]


def _dice(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice of two {0,1} float masks [B, K, H, W], pooled over the batch per channel and averaged
    over the channels (a channel empty in both scores 1), as validation averages them."""
    total = pred.sum(dim=(0, 2, 3)) + label.sum(dim=(0, 2, 3))
    overlap = 2 * (pred * label).sum(dim=(0, 2, 3))
    return torch.where(total > 0, overlap / total.clamp_min(1e-12), torch.ones_like(total)).mean()
