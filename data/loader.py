"""DataLoader helpers: a shuffle that keeps each worker's volume cache useful, and batching.

A plain random shuffle of volume slices makes every item a different case, so each one would
decode a whole volume. ``GroupedSampler`` shuffles the volumes, then shuffles the slices within
windows of ``window`` volumes: batches still mix several cases, and a worker's LRU cache of
``window`` volumes serves all of them. Datasets without volumes get a plain shuffle.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import DataLoader, Sampler

from data.datasets import DEFAULT_CACHE_VOLUMES, collate
from data.errors import DataConfigError


class GroupedSampler(Sampler):
    """Epoch order over a dataset, optionally sharded over ``world_size`` ranks.

    shuffle: False keeps the dataset order (evaluation). With ``dataset.group_ids`` (one group
    per volume) the shuffle is grouped as described in the module docstring.
    rank/world_size: this process takes every world_size-th index of the epoch's order, the
    order padded by wrapping so that every rank gets the same count (as DistributedSampler).
    Call ``set_epoch(e)`` for a new order each epoch.
    """

    def __init__(self, dataset, *, shuffle: bool = True, seed: int = 0, window: int = DEFAULT_CACHE_VOLUMES,
                 rank: int = 0, world_size: int = 1):
        self.n = len(dataset)
        groups = getattr(dataset, "group_ids", None)
        self.groups = None if groups is None else np.asarray(groups)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.window = max(1, int(window))
        self.rank = int(rank)
        self.world_size = max(1, int(world_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.groups is None:
            return rng.permutation(self.n)
        unique = np.unique(self.groups)
        shuffled = rng.permutation(unique)
        parts = []
        for start in range(0, len(shuffled), self.window):
            members = np.flatnonzero(np.isin(self.groups, shuffled[start:start + self.window]))
            parts.append(rng.permutation(members))
        return np.concatenate(parts)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        order = self._order()
        total = len(self) * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        return iter(order[self.rank:total:self.world_size].tolist())


def create_loader(dataset, *, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                  drop_last: bool = False, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """DataLoader over ``dataset`` with ``collate`` and a ``GroupedSampler``.

    Workers persist across epochs so that their volume caches do too; call
    ``loader.sampler.set_epoch(e)`` (or use ``iterate_forever``) for a fresh shuffle.
    """
    sampler = GroupedSampler(dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                             window=getattr(dataset, "cache_volumes", DEFAULT_CACHE_VOLUMES))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def iterate_forever(loader: DataLoader):
    """Yield batches endlessly, reshuffling each epoch (the improved-diffusion ``load_data`` style)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise DataConfigError(f"the data loader yields no batches: --batch_size {loader.batch_size} is larger "
                                  f"than the {len(loader.dataset)} items and incomplete batches are dropped")
        epoch += 1

