"""The image tokenizer interface: images <-> grids of codebook indices.

A VQ tokenizer turns a uint8 image (H, W, 3) into an (h, w) grid of codes in
[0, codebook_size); the sequence builder offsets them into the layout's image range.
Implementations: `kmeans.KMeansPatchVQ` (CPU demos); a MoVQGAN wrapper for real data.
"""

from __future__ import annotations

import abc

import numpy as np


class ImageTokenizer(abc.ABC):
    @abc.abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> int64 codes (N, h, w)."""

    @abc.abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes (N, h, w) -> uint8 images (N, H, W, 3)."""

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Side of the square images it encodes, in pixels."""

    @property
    @abc.abstractmethod
    def grid_size(self) -> int:
        """Side of the code grid: an image gives grid_size**2 codes."""

    @abc.abstractmethod
    def identity(self) -> str:
        """A content hash: equal identities mean equal codes for equal images."""

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    def _check_images(self, images: np.ndarray) -> None:
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise ValueError(f"{type(self).__name__}: expected uint8 images (N, "
                             f"{', '.join(map(str, expected))}), got {images.dtype} "
                             f"{tuple(images.shape)}")
