"""Fashion-MNIST mosaics with compositional captions: the mini-study's corpus of real images.

    from megatron_t2i.experiments.study import fashion
    images, labels = fashion.load_fashion_mnist()           # uint8 (70000, 28, 28), int64
    facts = fashion.build_mosaic_corpus(Path("mosaics"),
                                        counts={"train": 2000, "valid": 200, "test": 200})
    # -> mosaics/{train,valid,test}.jsonl ({"image": "images/train/00000.png", "caption": ...,
    #    "sources": [item ids]}) and the 64x64 RGB PNGs; facts["split_duplicates"] == 0

Fashion-MNIST (70,000 grey 28x28 photographs of clothing, 10 classes) comes from the Debian
package `dataset-fashion-mnist`, installed with apt-get when missing and run as root.

A mosaic is a grid x grid layout of cells (2x2 by default), each cell either empty (black) or
one Fashion-MNIST item upscaled to fill it: 1 to `max_items` cells (2 by default; the number
and the cells drawn uniformly) are filled. Its caption names every filled cell in row-major
order: "a sandal at the top left and a coat at the bottom right". At most two items keep the
captions short (about 11 tokens with a 4096-piece text tokenizer, 17 with 1024), so the
256 codes of a 16x16 image outnumber the caption's tokens as in the paper (1024 codes to
about 30 caption tokens); four items would make it about 6:1. The corpus is split **by source item** before any mosaic is drawn: the 70,000 items
are shuffled with the corpus's own `seed` (never a training seed) and cut into one disjoint
pool per split, so no photograph appears in two splits. `count_split_duplicates` checks it
on the written files.

The corpus is cached by content: a rerun with the same arguments (and the same source files)
finds `manifest.json` and writes nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from megatron_t2i.experiments.study.debian import ensure_debian_data

PACKAGE = "dataset-fashion-mnist"
FOLDER = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Fashion-MNIST's labels 0..9, as a caption says them (with their article)
CLASS_NAMES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
               "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
_ROWS = {1: ("",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {1: ("",), 2: ("left", "right"), 3: ("left", "centre", "right")}
SPLITS = ("train", "valid", "test")
_FORMAT = 2  # bump when the mosaics or captions change, so caches are rebuilt


def ensure_fashion_mnist() -> Path:
    """The folder with Fashion-MNIST's four idx files, installing the package if needed."""
    for images, labels in _FILES.values():
        ensure_debian_data(PACKAGE, FOLDER / images)
        ensure_debian_data(PACKAGE, FOLDER / labels)
    return FOLDER


def load_fashion_mnist(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train then test items: uint8 images (70000, 28, 28) and int64 labels (70000,)."""
    folder = folder or ensure_fashion_mnist()
    images, labels = [], []
    for image_file, label_file in _FILES.values():
        images.append(_read_idx(folder / image_file, 3))
        labels.append(_read_idx(folder / label_file, 1).astype(np.int64))
        if len(images[-1]) != len(labels[-1]):
            raise ValueError(f"{folder / image_file}: {len(images[-1])} images but "
                             f"{len(labels[-1])} labels in {label_file}")
    return np.concatenate(images), np.concatenate(labels)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x0000080N, then N big-endian int32 sizes)."""
    data = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(f"{path}: not a {ndim}-d idx file of unsigned bytes "
                         f"(magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def split_items(total: int, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint pools of source item ids, one per split, sized in proportion to its mosaics.
    Depends only on (total, counts, seed)."""
    order = np.random.default_rng([seed, 0xFA5]).permutation(total)
    n = sum(counts.values())
    edges = np.cumsum([0] + [round(total * counts[s] / n) for s in counts])
    edges[-1] = total
    return {s: np.sort(order[edges[i]:edges[i + 1]]) for i, s in enumerate(counts)}


def caption(labels: list[int | None], grid: int) -> str:
    """'a sandal at the top left and a coat at the bottom right' for filled cells."""
    parts = []
    for cell, label in enumerate(labels):
        if label is None:
            continue
        where = " ".join(w for w in (_ROWS[grid][cell // grid], _COLS[grid][cell % grid]) if w)
        parts.append(f"{CLASS_NAMES[label]} at the {where}" if where else CLASS_NAMES[label])
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def build_mosaic_corpus(out_dir: Path, *, counts: dict[str, int], image_size: int = 64,
                        grid: int = 2, seed: int = 0, max_items: int = 2) -> dict[str, Any]:
    """Write `out_dir/{split}.jsonl` and the PNGs; returns the mosaic counts per split, the
    source items each split uses, and `split_duplicates` (must be 0)."""
    if grid not in _ROWS or image_size % grid:
        raise ValueError(f"mosaic grid={grid} (1, 2 or 3) must divide image_size={image_size}")
    if not 1 <= max_items <= grid * grid:
        raise ValueError(f"mosaic max_items={max_items}: expected 1 to {grid * grid}")
    if set(counts) - set(SPLITS) or any(n < 0 for n in counts.values()):
        raise ValueError(f"mosaic counts {counts}: expected splits among {SPLITS}, each >= 0")
    out_dir = Path(out_dir)
    folder = ensure_fashion_mnist()
    params = {"counts": counts, "image_size": image_size, "grid": grid, "seed": seed,
              "max_items": max_items, "format": _FORMAT, "source": _source_identity(folder)}
    manifest = out_dir / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == params:
        return json.loads(manifest.read_text())["facts"]
    images, labels = load_fashion_mnist(folder)
    pools = split_items(len(images), counts, seed)
    facts: dict[str, Any] = {"mosaics": {}, "source_items": {}}
    for split, n in counts.items():
        rng = np.random.default_rng([seed, SPLITS.index(split), 0x3051])
        records = _write_split(out_dir, split, n, pools[split], images, labels, image_size,
                               grid, max_items, rng)
        facts["mosaics"][split] = len(records)
        facts["source_items"][split] = len({i for r in records for i in r["sources"]})
    facts["split_duplicates"] = count_split_duplicates(out_dir)
    facts["shared_source_items"] = shared_source_items(out_dir)
    manifest.write_text(json.dumps({"params": params, "facts": facts}, indent=1) + "\n")
    return facts


def _source_identity(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.gz"))}


def _write_split(out_dir: Path, split: str, n: int, pool: np.ndarray, images: np.ndarray,
                 labels: np.ndarray, image_size: int, grid: int, max_items: int,
                 rng: np.random.Generator) -> list[dict]:
    from PIL import Image

    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    cell = image_size // grid
    queue = iter(())
    records = []
    for k in range(n):
        filled = np.zeros(grid * grid, bool)
        filled[rng.choice(grid * grid, int(rng.integers(1, max_items + 1)), replace=False)] = True
        canvas = np.zeros((image_size, image_size), np.uint8)
        sources: list[int] = []
        cell_labels: list[int | None] = []
        for c in range(grid * grid):
            if not filled[c]:
                cell_labels.append(None)
                continue
            item = next(queue, None)
            if item is None:  # pool used up: a fresh pass in a new order (same split only)
                queue = iter(rng.permutation(pool).tolist())
                item = next(queue)
            r, col = divmod(c, grid)
            patch = Image.fromarray(images[item]).resize((cell, cell), Image.BILINEAR)
            canvas[r * cell:(r + 1) * cell, col * cell:(col + 1) * cell] = np.asarray(patch)
            sources.append(int(item))
            cell_labels.append(int(labels[item]))
        name = f"images/{split}/{k:05d}.png"
        Image.fromarray(np.repeat(canvas[:, :, None], 3, axis=2)).save(out_dir / name)
        records.append({"image": name, "caption": caption(cell_labels, grid),
                        "sources": sources})
    (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _records(out_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        path = Path(out_dir) / f"{split}.jsonl"
        if path.is_file():
            out[split] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


def count_split_duplicates(out_dir: Path) -> int:
    """Documents of a split equal to a document of an earlier split (train, valid, test):
    the same pixels and caption, or the same set of source items."""
    from PIL import Image

    seen: set[str] = set()
    duplicates = 0
    for records in _records(out_dir).values():
        keys = []
        for r in records:
            pixels = np.asarray(Image.open(Path(out_dir) / r["image"]).convert("RGB"))
            keys.append((hashlib.sha1(pixels.tobytes() + r["caption"].encode()).hexdigest(),
                         "items:" + ",".join(map(str, sorted(r.get("sources", []))))))
        duplicates += sum(a in seen or (b != "items:" and b in seen) for a, b in keys)
        seen.update(k for pair in keys for k in pair if k != "items:")
    return duplicates


def shared_source_items(out_dir: Path) -> int:
    """Fashion-MNIST items used by more than one split (stricter than whole documents)."""
    used = [{i for r in records for i in r.get("sources", [])}
            for records in _records(out_dir).values()]
    return sum(len(a & b) for k, a in enumerate(used) for b in used[k + 1:])
