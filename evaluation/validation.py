"""Validation of the diffusion UNet while it trains: ADDPM on held-out patients, next to its
pre-segmentation (an extension beyond the paper).

Every call segments the same validation cases with the truncated sampler (one member each, the
noise of every batch seeded by the run's seed and the batch's case ids, so successive calls
differ only by the weights) and scores, on the network grid, the addpm masks and the
pre-segmentation alone. The headline score is the mean over patients (volumes, or single cases
when the layout has neither) of the Dice of all a patient's slices pooled, as the per-patient
figures of ``sample.py`` are; slices where label and prediction are both empty count only there.
With several classes or regions the Dice is computed so per channel (``val_addpm_dice_<name>``;
groups where a channel is empty in both label and prediction are left out of that channel's mean)
and the headline is the mean over the channels that some validation label holds: a fixed set,
so that every validation, and the choice of best.pt, averages the same channels (a channel no
label holds is logged, not averaged: nan while it is predicted nowhere, 0 once it is; where no
label holds any channel, the defined ones are averaged).

Under torchrun every rank segments its share and the counts are gathered, so each rank returns
the same scores.
"""

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from data import collate
from evaluation.metrics import overlap_metrics
from guided_diffusion.dist_util import autocast_context
from guided_diffusion.mask_space import hard_channels, label_channels
from guided_diffusion.seg_sampling import case_generator, sample_members


def spread_cases(num_items: int, max_cases: int) -> list[int]:
    """At most ``max_cases`` indices spread evenly over ``range(num_items)`` (0 = all): every
    patient of an ordered dataset keeps some of its slices."""
    if max_cases <= 0 or max_cases >= num_items:
        return list(range(num_items))
    return sorted({int(round(i)) for i in np.linspace(0, num_items - 1, max_cases)})


def _group_of(meta: dict, case_id: str) -> str:
    return meta.get("volume_id") or meta.get("patient_id") or case_id


def _mean_group_dice(group_counts, row: int, channel: int = 0) -> float:
    """Mean Dice of one channel over the groups whose prediction or label is not empty (nan if
    none is)."""
    scores = [overlap_metrics(*c[row, channel], tn=0)["dice"] for c in group_counts
              if c[row, channel].sum() > 0]
    return float(np.mean(scores)) if scores else float("nan")


def _mean_over_channels(scores: list, labelled: list) -> float:
    """The headline of several channels: the mean over the ``labelled`` ones (those some
    validation label holds); where no label holds any, over those defined (nan if none is);
    one channel's score as it is."""
    if len(scores) == 1:
        return scores[0]
    chosen = [v for v, held in zip(scores, labelled) if held] or [v for v in scores if np.isfinite(v)]
    return float(np.mean(chosen)) if chosen else float("nan")


class AddpmValidator:
    """``validator(model) -> scores`` for ``TrainLoop``; see the module docstring.

    Args (keyword-only):
        dataset: validation items (``image``, ``label``, ``case_id``, ``meta``).
        plan: the ``SamplerPlan`` of the truncated sampler (``plan_sampler("addpm", ...)``).
        diffusion, mask_space: the diffusion being trained and its mask space.
        preseg: ``f(batch) -> [B, K, S, S]`` per-channel probabilities (``preseg.PresegSource``).
        mask_channels, exclusive: K and the label mode (classes or regions), the model's.
        channel_names: a name per channel (``Preprocess.class_names``), in the per-channel keys.
        denoise_fn: the final step for ``plan.final_step == "denoiser"``, else None.
        max_cases: cap on validation slices (0 = all), spread over the dataset.
        batch_size: images per sampling batch.
        ctx: the ``dist_util.DistContext``; seed: the run's seed; precision: autocast precision.
        progress: show a progress bar on rank 0.
    """

    def __init__(self, *, dataset, plan, diffusion, mask_space, preseg, denoise_fn, max_cases,
                 batch_size, ctx, seed=0, precision="fp32", progress=True, mask_channels=1,
                 exclusive=True, channel_names=("foreground",)):
        if len(channel_names) != mask_channels:
            raise ValueError(f"{len(channel_names)} channel names for {mask_channels} mask channels")
        self.plan = plan
        self.mask_channels = mask_channels
        self.exclusive = exclusive
        self.channel_names = tuple(channel_names)
        self.diffusion = diffusion
        self.mask_space = mask_space
        self.preseg = preseg
        self.denoise_fn = denoise_fn
        self.ctx = ctx
        self.seed = seed
        self.precision = precision
        self.progress = progress
        self.cases = spread_cases(len(dataset), max_cases)
        self.loader = DataLoader(Subset(dataset, self.cases[ctx.rank::ctx.world_size]),
                                 batch_size=batch_size, shuffle=False, collate_fn=collate)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        counts = defaultdict(self._zero_counts)
        device = self.ctx.device
        bar = tqdm(self.loader, desc="validation", unit="batch", leave=False,
                   disable=not (self.progress and self.ctx.is_main))
        for batch in bar:
            images = batch["image"].to(device)
            generator = case_generator(self.seed, 0, batch["case_id"], device)
            with autocast_context(device, self.precision):
                preseg = self.preseg(batch)
                members = sample_members(
                    self.plan, diffusion=self.diffusion, model=model, images=images, num_ensemble=1,
                    mask_space=self.mask_space, preseg_probs=preseg, denoise_fn=self.denoise_fn,
                    generator=generator, mask_channels=self.mask_channels, exclusive=self.exclusive,
                )
            # [B, K, S, S] decisions: per channel (regions) or the most probable class.
            addpm = hard_channels(members[:, 0].float().cpu(), self.exclusive).bool()
            pre = hard_channels(preseg.float().cpu(), self.exclusive).bool()
            label = label_channels(batch["label"].cpu()).bool()
            for i, (case_id, meta) in enumerate(zip(batch["case_id"], batch["meta"])):
                group = counts[_group_of(meta, case_id)]
                for row, pred in enumerate((addpm[i], pre[i])):
                    for k in range(self.mask_channels):
                        tp = int((pred[k] & label[i, k]).sum())
                        group[row, k] += (tp, int(pred[k].sum()) - tp, int(label[i, k].sum()) - tp)
        counts = self._gather(dict(counts))
        return self._scores(counts)

    def _zero_counts(self):
        return np.zeros((2, self.mask_channels, 3), dtype=np.int64)  # [addpm|preseg] x K x [tp fp fn]

    def _scores(self, counts: dict) -> dict:
        """The logged scores: the headline means, and with several channels each channel's."""
        per_channel = [[_mean_group_dice(counts.values(), row, k) for k in range(self.mask_channels)]
                       for row in (0, 1)]
        # tp + fn of a channel, summed over the groups: its label voxels (the same in both rows).
        labelled = [sum(int(c[0, k, 0] + c[0, k, 2]) for c in counts.values()) > 0
                    for k in range(self.mask_channels)]
        addpm, preseg = (_mean_over_channels(scores, labelled) for scores in per_channel)
        scores = {"val_score": addpm, "val_addpm_dice": addpm, "val_preseg_dice": preseg,
                  "val_gain": addpm - preseg}
        if self.mask_channels > 1:
            for name, a, p in zip(self.channel_names, *per_channel):
                scores[f"val_addpm_dice_{name}"] = a
                scores[f"val_preseg_dice_{name}"] = p
        scores.update(val_groups=len(counts), val_cases=len(self.cases))
        return scores

    def _gather(self, counts: dict) -> dict:
        if not (self.ctx.is_distributed and dist.is_initialized()):
            return counts
        parts = [None] * self.ctx.world_size
        dist.all_gather_object(parts, counts)
        merged = defaultdict(self._zero_counts)
        for part in parts:
            for group, c in part.items():
                merged[group] += c
        return dict(merged)
