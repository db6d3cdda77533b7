"""A synthetic text-to-image corpus where the caption decides the picture.

Each image holds one or two coloured shapes on a black background, each in one cell of a 3x3
grid; the caption names every shape, colour and position, in reading order:

    "a red circle at the top left and a blue square at the bottom right"

Shapes sit at fixed cell centres with a fixed size, so `describe(image)` can read the objects
back from a clean image (and, more loosely, from a generated one), and
`caption(describe(image)) == caption` holds for every corpus image. That is what lets a demo
run check that a trained model follows its captions.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
POSITIONS = ("top left", "top centre", "top right",
             "middle left", "centre", "middle right",
             "bottom left", "bottom centre", "bottom right")
BACKGROUND = (0, 0, 0)
_HALF_SIZE = 0.13  # of the image side: shapes stay inside their cell with a margin


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str


@dataclasses.dataclass
class SyntheticCorpus:
    images: np.ndarray  # uint8 (N, H, W, 3)
    captions: list[str]
    objects: list[tuple[SceneObject, ...]]  # per image, in reading order


def caption(objects: tuple[SceneObject, ...]) -> str:
    """The caption of a scene; objects are named in reading order (top left first)."""
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o.position))
    return " and ".join(f"a {o.colour} {o.shape} at the {o.position}" for o in ordered)


def parse_caption(text: str) -> tuple[SceneObject, ...]:
    """The objects a caption asks for (the inverse of `caption`), in reading order."""
    objects = []
    for part in text.strip().split(" and "):
        words = part.split(" at the ")
        head = words[0].split()
        if len(words) != 2 or len(head) != 3 or head[0] != "a" or head[1] not in COLOURS \
                or head[2] not in SHAPES or words[1] not in POSITIONS:
            raise ValueError(f"not a synthetic-corpus caption: {text!r} (expected "
                             f"'a <colour> <shape> at the <position>' joined by ' and ')")
        objects.append(SceneObject(head[2], head[1], words[1]))
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def render(objects: tuple[SceneObject, ...], image_size: int = 32) -> np.ndarray:
    """Draw a scene: uint8 (H, W, 3)."""
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        image[_mask(o.shape, POSITIONS.index(o.position), image_size)] = COLOURS[o.colour]
    return image


def generate(num_samples: int, image_size: int = 32, seed: int = 0,
             max_objects: int = 2) -> SyntheticCorpus:
    """A deterministic corpus: the same arguments give the same images and captions."""
    if image_size < 12:
        raise ValueError(f"synthetic corpus: image_size={image_size} is too small for a 3x3 "
                         f"grid of shapes (need >= 12)")
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    scenes = []
    for _ in range(num_samples):
        count = int(rng.integers(1, max_objects + 1))
        cells = np.sort(rng.choice(len(POSITIONS), size=count, replace=False))
        scenes.append(tuple(SceneObject(SHAPES[rng.integers(len(SHAPES))],
                                        colours[rng.integers(len(colours))],
                                        POSITIONS[c]) for c in cells))
    images = np.stack([render(s, image_size) for s in scenes]) if scenes else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    return SyntheticCorpus(images, [caption(s) for s in scenes], scenes)


def describe(image: np.ndarray, min_fill: float = 0.25) -> tuple[SceneObject, ...]:
    """Read the objects back from an image (H, W, 3), one guess per occupied grid cell.

    A cell is occupied when enough of its shape's bounding box differs from the background;
    the colour is the nearest palette colour of those pixels, the shape the one whose mask
    overlaps them best. Exact on clean renders; tolerant of noise in generated images.
    """
    size = image.shape[0]
    pixels = image.astype(np.int32)
    fg = np.abs(pixels - np.array(BACKGROUND)).sum(-1) > 120
    found = []
    for cell, position in enumerate(POSITIONS):
        if fg[_box(cell, size)].mean() < min_fill:
            continue
        here = fg & _box_mask(cell, size)
        colour = _nearest_colour(pixels[here].mean(0))
        shape = max(SHAPES, key=lambda s, cell=cell: _iou(_mask(s, cell, size), here))
        found.append(SceneObject(shape, colour, position))
    return tuple(found)


# ---- geometry ---------------------------------------------------------------------------

def _centre(cell: int, size: int) -> tuple[float, float]:
    row, col = divmod(cell, 3)
    return (row + 0.5) * size / 3, (col + 0.5) * size / 3


@cache
def _mask(shape: str, cell: int, size: int) -> np.ndarray:
    """Boolean (H, W) mask of a shape centred in a grid cell (cached: 27 masks per size)."""
    cy, cx = _centre(cell, size)
    s = _HALF_SIZE * size
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= s**2
    elif shape == "square":
        mask = (np.abs(dy) <= 0.85 * s) & (np.abs(dx) <= 0.85 * s)
    elif shape == "triangle":  # apex up, base as wide as the circle
        mask = (dy >= -s) & (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask.setflags(write=False)
    return mask


def _box(cell: int, size: int) -> tuple[slice, slice]:
    cy, cx = _centre(cell, size)
    s = _HALF_SIZE * size
    return (slice(int(cy - s), int(np.ceil(cy + s))), slice(int(cx - s), int(np.ceil(cx + s))))


def _box_mask(cell: int, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[_box(cell, size)] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(-1)))]
