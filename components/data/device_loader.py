"""Batches straight from device memory: shuffling, crop and flip done on the device, per sample, in batches.

Adversarial training runs 10-30 forward passes per image, so the loader must never be the bottleneck and
must never make the device wait for the host. The whole dataset sits on the device as uint8 (CIFAR-10's
training set is 150 MB); a batch is an index gather, an optional augmentation built from tensor ops, and a
division by 255. Nothing here calls ``.item()`` or ``.cpu()``.

Randomness is counter-based: the permutation of epoch ``e`` comes from a generator seeded by
``(seed, e)``, shared by all DDP ranks, and the augmentation of epoch ``e`` on rank ``r`` from one seeded by
``(seed, e, r)``. So any epoch can be reproduced without replaying the ones before it, and a resumed run
(see :meth:`DeviceLoader.state_dict`) sees exactly the batches and augmentations of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["Batch", "DeviceLoader"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_PERM_STREAM = 0
_AUG_STREAM = 1


def _derive_seed(*key: int) -> int:
    # SeedSequence mixes the key into a well-spread 64-bit seed, so nearby (seed, epoch) pairs do not give
    # correlated torch streams, and it is stable across numpy versions.
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0])


class DeviceLoader:
    """Iterate ``(x, y, idx)`` batches of a dataset held on one device.

    ``x`` is float32 ``(B, C, H, W)`` in [0, 1], ``y`` int64 labels, ``idx`` int64 positions of the samples
    in ``images`` (for per-example buffers such as an attack's prior perturbation). ``images`` is a uint8
    ``(N, C, H, W)`` tensor; several loaders (one per DDP rank, say) can share it without copies.

    Args:
        images: uint8 ``(N, C, H, W)``; moved to ``device`` (no copy if already there).
        labels: integer ``(N,)``; stored as int64 on ``device``.
        batch_size: images per batch on this rank.
        shuffle: a fresh permutation every epoch; otherwise dataset order.
        drop_last: drop the last incomplete batch (and, under DDP, the tail that does not split evenly
            over the ranks); otherwise keep it (and pad the shards by wrapping around, as
            ``DistributedSampler`` does, so every rank has the same number of batches).
        augment: random crop with ``pad`` pixels of zero padding and random horizontal flip, per sample.
        pad: padding of the random crop.
        seed: base seed of shuffling and augmentation; all DDP ranks must use the same one.
        rank, world_size: this process's strided shard of each epoch's permutation.
        device: where data and generators live; defaults to ``images.device``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        pad: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if images.shape[0] == 0:
            raise ValueError("cannot iterate an empty dataset")

        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.pad = int(pad)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)

        n = self.num_samples
        # Every rank gets the same shard length, hence the same number of batches: DDP would hang on a
        # collective if one rank ran an extra step.
        self._shard_len = n // world_size if drop_last else math.ceil(n / world_size)
        self._num_batches = (
            self._shard_len // self.batch_size if drop_last else math.ceil(self._shard_len / self.batch_size)
        )
        if self._num_batches == 0:
            raise ValueError(
                f"no batches: {n} samples over {world_size} rank(s) give {self._shard_len} per rank, "
                f"fewer than batch_size={batch_size} with drop_last=True; lower the batch size or add data"
            )

        self._perm_gen = torch.Generator(device=self.device)
        self._aug_gen = torch.Generator(device=self.device)
        self._epoch = 0  # the epoch the next pass runs
        self._resume: tuple[int, torch.Tensor] | None = None  # (batches done, aug generator state)
        self._progress: tuple[int, int] | None = None  # (epoch, batches done) of the pass in flight

    # ------------------------------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Samples in the whole dataset (all ranks together); size per-example buffers with this."""
        return int(self.images.shape[0])

    @property
    def epoch(self) -> int:
        """The epoch the next pass over the data will run."""
        return self._epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Run ``epoch`` next (its permutation and augmentations are fixed by ``seed`` and ``epoch`` alone).
        Not needed in a plain loop: every full pass advances the epoch by itself."""
        self._epoch = int(epoch)
        self._resume = None

    # ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the epoch, the batches already served in it, and the augmentation
        generator's state. Loading it into a fresh loader (same data, seed and batch size) continues with
        exactly the batches an uninterrupted loader would have served next."""
        state: dict[str, Any] = {"seed": self.seed, "epoch": self._epoch, "batch": 0, "generator": None}
        if self._progress is not None:
            epoch, done = self._progress
            if 0 < done < self._num_batches:  # stopped mid-epoch: resume inside it
                state.update(epoch=epoch, batch=done, generator=self._aug_gen.get_state())
        elif self._resume is not None:  # loaded but not iterated yet
            state.update(batch=self._resume[0], generator=self._resume[1].clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the loader must hold the same data and use the same seed."""
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"loader state was saved with seed={state['seed']}, this loader has seed={self.seed}; "
                "resuming would replay different batches"
            )
        self._epoch = int(state["epoch"])
        batch = int(state.get("batch", 0))
        if not 0 <= batch < self._num_batches:
            raise ValueError(
                f"saved position batch={batch} is outside this loader's {self._num_batches} batches"
            )
        generator = state.get("generator")
        self._resume = (batch, generator.clone()) if batch > 0 and generator is not None else None
        self._progress = None

    # ------------------------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample positions for ``epoch``."""
        n = self.num_samples
        if self.shuffle:
            self._perm_gen.manual_seed(_derive_seed(self.seed, epoch, _PERM_STREAM))
            order = torch.randperm(n, generator=self._perm_gen, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        total = self._shard_len * self.world_size
        if total > n:  # pad by wrapping around so that the shards come out equal
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        start, aug_state = self._resume if self._resume is not None else (0, None)
        self._epoch, self._resume = epoch + 1, None
        self._progress = (epoch, start)

        order = self._epoch_order(epoch)
        if aug_state is not None:
            self._aug_gen.set_state(aug_state)
        else:
            self._aug_gen.manual_seed(_derive_seed(self.seed, epoch, _AUG_STREAM, self.rank))

        sequential = not self.shuffle and self.world_size == 1
        for b in range(start, self._num_batches):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self._shard_len)
            idx = order[lo:hi]
            if sequential:  # eval: a slice is a view, cheaper than a gather
                xb, yb = self.images[lo:hi], self.labels[lo:hi]
            else:
                xb, yb = self.images[idx], self.labels[idx]
            if self.augment:
                xb = self._crop_flip(xb)
            self._progress = (epoch, b + 1)
            yield xb.to(torch.float32).div_(255), yb, idx
        self._progress = None

    def _crop_flip(self, xb: torch.Tensor) -> torch.Tensor:
        """Random crop from the zero-padded image and random horizontal flip, independently per sample.

        Works on uint8 (a quarter of float32's memory traffic): each sample's crop is a gather with its own
        row/column index grid, and the flip is the same gather with the column grid reversed.
        """
        B, C, H, W = xb.shape
        p, dev, gen = self.pad, xb.device, self._aug_gen
        if p > 0:
            xb = torch.nn.functional.pad(xb, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (B, 1), device=dev, generator=gen)
        dx = torch.randint(0, 2 * p + 1, (B, 1), device=dev, generator=gen)
        flip = torch.randint(0, 2, (B, 1), device=dev, generator=gen).bool()
        rows = dy + torch.arange(H, device=dev)  # (B, H)
        cols = dx + torch.arange(W, device=dev)  # (B, W)
        cols = torch.where(flip, cols.flip(1), cols)
        b_idx = torch.arange(B, device=dev)[:, None, None, None]
        c_idx = torch.arange(C, device=dev)[None, :, None, None]
        return xb[b_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]
