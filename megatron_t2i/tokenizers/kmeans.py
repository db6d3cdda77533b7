"""A k-means patch VQ: the CPU stand-in for a learned VQ image tokenizer.

Each non-overlapping p x p patch becomes the index of its nearest centroid. Fitting runs
weighted Lloyd iterations over the *distinct* patches (synthetic corpora repeat patches a lot,
so this is fast), all in numpy: deterministic for a seed on a given machine.
Saved as an .npz of plain arrays (read with allow_pickle=False).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from megatron_t2i.tokenizers.image import ImageTokenizer

_CHUNK = 65536  # patches per distance computation: bounds memory at chunk x codebook floats


class KMeansPatchVQ(ImageTokenizer):
    def __init__(self, codebook: np.ndarray, patch_size: int, image_size: int) -> None:
        if image_size % patch_size:
            raise ValueError(f"k-means VQ: image_size={image_size} is not a multiple of "
                             f"patch_size={patch_size}")
        if codebook.ndim != 2 or codebook.shape[1] != patch_size * patch_size * 3:
            raise ValueError(f"k-means VQ: codebook shape {codebook.shape} does not fit "
                             f"{patch_size}x{patch_size}x3 patches")
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)  # (K, p*p*3)
        self.patch_size = patch_size
        self._image_size = image_size

    # ---- fitting ----------------------------------------------------------------------
    @classmethod
    def fit(cls, images: np.ndarray, codebook_size: int, patch_size: int, seed: int = 0,
            iters: int = 20) -> KMeansPatchVQ:
        """Fit a codebook to the patches of uint8 images (N, H, W, 3)."""
        size = images.shape[1]
        if images.ndim != 4 or images.shape[2] != size or size % patch_size:
            raise ValueError(f"k-means VQ: expected square images whose side is a multiple "
                             f"of patch_size={patch_size}, got {tuple(images.shape)}")
        points, weights = _distinct(_patches(images, patch_size))
        rng = np.random.default_rng(seed)
        centroids = _init(points, weights, codebook_size, rng)
        for _ in range(iters):
            assign, dist = _nearest(points, centroids)
            updated = _update(points, weights, assign, centroids, dist)
            if np.array_equal(updated, centroids):
                break
            centroids = updated
        return cls(centroids, patch_size, size)

    # ---- the interface ----------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        self._check_images(images)
        g = self.grid_size
        distinct, inverse = _distinct(_patches(images, self.patch_size), inverse=True)
        codes, _ = _nearest(distinct, self.codebook)  # each distinct patch once
        return codes[inverse].reshape(len(images), g, g)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        g, p = self.grid_size, self.patch_size
        if codes.ndim != 3 or codes.shape[1:] != (g, g):
            raise ValueError(f"k-means VQ: expected codes (N, {g}, {g}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"k-means VQ: codes outside [0, {self.codebook_size})")
        pixels = np.clip(np.rint(self.codebook[codes]), 0, 255).astype(np.uint8)
        pixels = pixels.reshape(len(codes), g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return np.ascontiguousarray(pixels.reshape(len(codes), g * p, g * p, 3))

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def grid_size(self) -> int:
        return self._image_size // self.patch_size

    def identity(self) -> str:
        h = hashlib.sha256(f"kmeans-patch-vq:{self.patch_size}:{self._image_size}:".encode())
        h.update(self.codebook.tobytes())
        return h.hexdigest()

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would otherwise append .npz
            np.savez(f, codebook=self.codebook, patch_size=np.int64(self.patch_size),
                     image_size=np.int64(self._image_size))

    @classmethod
    def load(cls, path: str | Path) -> KMeansPatchVQ:
        if not Path(path).is_file():
            raise FileNotFoundError(f"k-means VQ file {path} not found")
        with np.load(path, allow_pickle=False) as f:
            return cls(f["codebook"], int(f["patch_size"]), int(f["image_size"]))


def _patches(images: np.ndarray, p: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N * (H/p) * (W/p), p*p*3), patches in row-major grid order."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, p * p * c)


def _distinct(patches: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distinct patches (float32) and their counts (the k-means weights), or, with
    inverse=True, the index of each patch's distinct row."""
    rows = np.ascontiguousarray(patches).view(np.dtype((np.void, patches.shape[1])))
    _, first, where, counts = np.unique(rows.ravel(), return_index=True, return_inverse=True,
                                        return_counts=True)
    second = where.reshape(-1) if inverse else counts.astype(np.float64)
    return patches[first].astype(np.float32), second


def _init(points: np.ndarray, weights: np.ndarray, k: int,
          rng: np.random.Generator) -> np.ndarray:
    """k distinct points drawn in proportion to frequency (all of them, repeated, if fewer)."""
    if len(points) <= k:
        extra = rng.choice(len(points), size=k - len(points), p=weights / weights.sum())
        return np.concatenate([points, points[extra]])
    pick = rng.choice(len(points), size=k, replace=False, p=weights / weights.sum())
    return points[np.sort(pick)].copy()


def _nearest(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and squared distance to the nearest centroid, chunked to bound memory."""
    c2 = (centroids.astype(np.float32) ** 2).sum(1)
    assign = np.empty(len(points), np.int64)
    dist = np.empty(len(points), np.float32)
    for s in range(0, len(points), _CHUNK):
        x = points[s:s + _CHUNK].astype(np.float32)
        d = c2[None, :] - 2 * x @ centroids.T
        assign[s:s + _CHUNK] = d.argmin(1)
        dist[s:s + _CHUNK] = d[np.arange(len(x)), assign[s:s + _CHUNK]] + (x**2).sum(1)
    return assign, dist


def _update(points: np.ndarray, weights: np.ndarray, assign: np.ndarray,
            centroids: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Weighted means; an empty cluster moves to the worst-fitted remaining point."""
    k = len(centroids)
    mass = np.bincount(assign, weights=weights, minlength=k)
    sums = np.zeros((k, points.shape[1]), np.float64)
    np.add.at(sums, assign, points * weights[:, None])
    updated = centroids.copy()
    full = mass > 0
    updated[full] = (sums[full] / mass[full, None]).astype(np.float32)
    worst = np.argsort(-(dist * weights), kind="stable")
    for cluster, point in zip(np.flatnonzero(~full), worst):
        if dist[point] > 0:
            updated[cluster] = points[point]
    return updated
