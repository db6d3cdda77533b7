"""Caption fidelity on the demo corpus: does a generated image show what its caption asks?

The synthetic corpus (data/synthetic.py) draws shapes at fixed grid cells, so `describe`
reads shapes, colours and positions back from a picture and `parse_caption` reads the request
from its caption. Scores, over all images:

    exact     the objects read back equal the objects asked for (nothing missing, nothing extra)
    count     as many objects as asked for
    position  of the objects asked for, the fraction whose grid cell holds a shape
    shape     ... whose cell holds the asked-for shape
    colour    ... whose cell holds the asked-for colour
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_t2i.data.synthetic import SceneObject, describe, parse_caption


def caption_fidelity(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Scores in [0, 1] for uint8 images [n, h, w, 3] and their captions."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"caption fidelity: {len(images)} images for {len(captions)} captions")
    exact = count = 0
    hits = {"position": 0, "shape": 0, "colour": 0}
    asked_total = 0
    for image, text in zip(images, captions):
        asked, found = parse_caption(text), describe(image)
        exact += set(asked) == set(found)
        count += len(asked) == len(found)
        at = {o.position: o for o in found}
        asked_total += len(asked)
        for o in asked:
            hits["position"] += o.position in at
            hits["shape"] += _same(at.get(o.position), o, "shape")
            hits["colour"] += _same(at.get(o.position), o, "colour")
    n = len(images)
    return {"exact": exact / n, "count": count / n,
            **{k: v / asked_total for k, v in hits.items()}, "num_images": n}


def _same(found: SceneObject | None, asked: SceneObject, attribute: str) -> bool:
    return found is not None and getattr(found, attribute) == getattr(asked, attribute)


def fidelity_of_samples(path: str | Path) -> dict[str, float | str]:
    """Scores for a samples.npz of tools/generate_images.py (arrays `images`, `captions`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with np.load(path, allow_pickle=False) as f:
        for key in ("images", "captions"):
            if key not in f:
                raise KeyError(f"{path}: no {key!r} array (has {list(f.keys())})")
        images, captions = f["images"], [str(c) for c in f["captions"]]
    return dict(caption_fidelity(images, captions), samples=str(path))
