"""The data-parallel, resumable sampler: which sample indices each rank reads next.

Epoch e visits the samples in the order of a permutation drawn from `seed + e`. A global step
takes the next `micro_batch_size x data_parallel_size` positions of it and rank r keeps its
contiguous slice, so the ranks of one step are disjoint and together cover it. The incomplete
tail of an epoch is dropped, so every step is full on every rank.

The position is a single number, `consumed_samples` (all ranks together, as Megatron counts
it): a sampler built with the value saved in a checkpoint continues the same stream.

The ids it yields are epoch-qualified, `epoch * num_samples + index`: a dataset reads item
`id % len` and may vary what it returns with `id // len` (caption dropout does), deterministically.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class DataParallelSampler:
    """An infinite iterator of index lists, one micro batch per next(); usable as a
    DataLoader `batch_sampler`."""

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.step_size = micro_batch_size * data_parallel_size
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("sampler: micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"sampler: data_parallel_rank={data_parallel_rank} is outside "
                             f"[0, {data_parallel_size})")
        if num_samples < self.step_size:
            raise ValueError(f"sampler: {num_samples} samples cannot fill one step of "
                             f"micro_batch_size x data_parallel_size = {self.step_size}")
        if consumed_samples < 0 or consumed_samples % self.step_size:
            raise ValueError(f"sampler: consumed_samples={consumed_samples} is not a multiple "
                             f"of micro_batch_size x data_parallel_size = {self.step_size}")
        self.num_samples = num_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.seed = seed
        self.shuffle = shuffle
        self.samples_per_epoch = num_samples // self.step_size * self.step_size
        self._epoch: int | None = None
        self._order = np.empty(0, np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
        start = offset + self.rank * self.micro_batch_size
        batch = self._epoch_order(epoch)[start:start + self.micro_batch_size]
        self.consumed_samples += self.step_size
        return (batch + epoch * self.num_samples).tolist()

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._order = (np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
                           if self.shuffle else np.arange(self.num_samples))
            self._epoch = epoch
        return self._order
