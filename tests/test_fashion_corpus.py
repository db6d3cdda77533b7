"""The Fashion-MNIST mosaic corpus: real items, compositional captions, split by source item."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_t2i.experiments.study import fashion
from megatron_t2i.experiments.study.debian import MissingData

COUNTS = {"train": 40, "valid": 10, "test": 10}


@pytest.fixture(scope="module")
def items() -> tuple[np.ndarray, np.ndarray]:
    try:
        return fashion.load_fashion_mnist()
    except MissingData as e:  # not root and no package: nothing to test against
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def mosaics(items, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mosaics")
    fashion.build_mosaic_corpus(out, counts=COUNTS, seed=3)
    return out


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def test_load_reads_all_seventy_thousand_items(items):
    images, labels = items
    assert images.shape == (70000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (70000,) and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).tolist() == [7000] * 10  # Fashion-MNIST is balanced
    assert images.max() == 255 and images[:2000].std() > 50  # photographs, not blank arrays


def test_caption_names_filled_cells_in_reading_order():
    assert fashion.caption([5, None, None, 4], 2) == \
        "a sandal at the top left and a coat at the bottom right"
    assert fashion.caption([None, 9, 0, 1], 2) == ("an ankle boot at the top right, a t-shirt "
                                                   "at the bottom left and a pair of trousers "
                                                   "at the bottom right")
    assert fashion.caption([None, None, None, 8], 2) == "a bag at the bottom right"


def test_mosaics_are_real_items_with_matching_captions(items, mosaics):
    images, labels = items
    for split, n in COUNTS.items():
        records = _records(mosaics, split)
        assert len(records) == n
        for r in records:
            pixels = np.asarray(Image.open(mosaics / r["image"]))
            assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
            assert 1 <= len(r["sources"]) <= 2  # max_items
            for item in r["sources"]:
                assert fashion.CLASS_NAMES[labels[item]] in r["caption"]
            assert r["caption"].count(" at the ") == len(r["sources"])
    assert {len(r["sources"]) for r in _records(mosaics, "train")} == {1, 2}
    for r in _records(mosaics, "valid"):  # each filled cell is its source item, upscaled
        pixels = np.asarray(Image.open(mosaics / r["image"]))[:, :, 0]
        cells = [pixels[y:y + 32, x:x + 32] for y in (0, 32) for x in (0, 32)]
        filled = [c for c in cells if c.any()]
        assert len(filled) == len(r["sources"])
        for c, item in zip(filled, r["sources"]):
            expected = Image.fromarray(images[item]).resize((32, 32), Image.BILINEAR)
            assert np.array_equal(c, np.asarray(expected))


def test_no_source_item_or_document_crosses_splits(mosaics):
    used = {s: {i for r in _records(mosaics, s) for i in r["sources"]} for s in COUNTS}
    assert not used["train"] & used["valid"] and not used["train"] & used["test"]
    assert not used["valid"] & used["test"]
    assert fashion.count_split_duplicates(mosaics) == 0
    assert fashion.shared_source_items(mosaics) == 0
    manifest = json.loads((mosaics / "manifest.json").read_text())
    assert manifest["facts"]["split_duplicates"] == 0


def test_split_depends_only_on_the_corpus_seed():
    a = fashion.split_items(70000, COUNTS, seed=3)
    b = fashion.split_items(70000, COUNTS, seed=3)
    c = fashion.split_items(70000, COUNTS, seed=4)
    assert all(np.array_equal(a[s], b[s]) for s in COUNTS)
    assert not np.array_equal(a["valid"], c["valid"])
    assert sum(map(len, a.values())) == 70000
    assert len(np.unique(np.concatenate(list(a.values())))) == 70000  # disjoint, complete


def test_duplicate_check_catches_a_leaked_document(mosaics, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(mosaics, leaky)
    train = _records(leaky, "train")
    with open(leaky / "valid.jsonl", "a") as f:
        f.write(json.dumps(train[0]) + "\n")  # same image and caption
        f.write(json.dumps({**train[1], "image": _records(leaky, "valid")[0]["image"]}) + "\n")
    assert fashion.count_split_duplicates(leaky) == 2
    assert fashion.shared_source_items(leaky) == len(set(train[0]["sources"]) |
                                                     set(train[1]["sources"]))


def test_rerun_reuses_the_corpus(mosaics):
    before = {p: p.stat().st_mtime_ns for p in mosaics.rglob("*") if p.is_file()}
    facts = fashion.build_mosaic_corpus(mosaics, counts=COUNTS, seed=3)
    assert facts["mosaics"] == COUNTS and facts["split_duplicates"] == 0
    assert {p: p.stat().st_mtime_ns for p in mosaics.rglob("*") if p.is_file()} == before
