"""Weighted blends of several datasets, with megatron-core's blending order.

Position j of a blend epoch is assigned to a dataset by megatron-core's
`helpers.build_blending_indices` (at each position, the dataset furthest below its share so
far), so every prefix of the order is within one sample of the weights. megatron-core's own
`BlendedDataset` cannot serve here: it takes only `MegatronDataset`s of one class (we blend
image-caption and packed-text datasets), and it refuses to draw more samples from a dataset
than it holds, whereas a small dataset with a large weight should simply be repeated.

So a dataset's k-th draw (counted over all blend epochs) is its item k mod len in an order
reshuffled each time the dataset wraps, passed on with the epoch-qualified id the datasets
understand (`epoch * len + item`, see dataset.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from megatron.core.datasets import helpers


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 seed: int = 0, size: int | None = None) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"blend: {len(datasets)} datasets but {len(weights)} weights")
        if any(w <= 0 for w in weights) or any(len(d) == 0 for d in datasets):
            raise ValueError("blend: every weight must be positive and every dataset non-empty")
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.seed = seed
        self.size = size or sum(len(d) for d in datasets)
        self.dataset_index = np.zeros(self.size, dtype=np.int16)
        self.dataset_sample_index = np.zeros(self.size, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index,
                                       self.weights, len(self.datasets), self.size, False)
        self.draws_per_epoch = np.bincount(self.dataset_index, minlength=len(self.datasets))
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(int(i), self.size)
        d = int(self.dataset_index[j])
        draw = epoch * int(self.draws_per_epoch[d]) + int(self.dataset_sample_index[j])
        n = len(self.datasets[d])
        wrap, k = divmod(draw, n)
        return self.datasets[d][wrap * n + int(self._order(d, wrap)[k])]

    def source_of(self, i: int) -> int:
        """Which dataset sample id `i` is drawn from."""
        return int(self.dataset_index[int(i) % self.size])

    def _order(self, d: int, wrap: int) -> np.ndarray:
        cached = self._orders.get(d)
        if cached is None or cached[0] != wrap:
            rng = np.random.default_rng([self.seed, d, wrap, 0xB1E])
            cached = (wrap, rng.permutation(len(self.datasets[d])))
            self._orders[d] = cached
        return cached[1]
