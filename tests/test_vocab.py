"""The vocabulary layout: id ranges, padding, persistence and mismatch reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_t2i.vocab import VocabLayout, VocabMismatchError


def _paper(**kw) -> VocabLayout:
    """The paper's 1B model: a 50,432-id text tokenizer with its own pad, 16,384 image codes."""
    args = dict(text_size=50_432, image_size=16_384, bos_id=0, eod_id=1, text_pad_id=2)
    args.update(kw)
    return VocabLayout(**args)


def test_paper_example_sizes() -> None:
    v = _paper()
    assert v.added_specials == ("<boi>", "<eoi>")  # the text tokenizer brings its own pad
    assert v.size == 66_818
    assert v.padded_size(128, 1) == 66_944
    at_tp2 = v.padded_size(128, 2)
    assert at_tp2 % 256 == 0 and at_tp2 >= v.size and at_tp2 - v.size < 256
    assert at_tp2 == 67_072
    assert v.pad_id == 2


def test_padding_exact_multiple_is_kept() -> None:
    v = VocabLayout(text_size=120, image_size=6, bos_id=0, eod_id=1, text_pad_id=3)
    assert v.size == 128 and v.padded_size(128, 1) == 128
    assert v.padded_size(64, 4) == 256


def test_ranges_are_contiguous_and_disjoint() -> None:
    v = _paper()
    spans = sorted(v.ranges().values())
    assert spans[0][0] == 0 and spans[-1][1] == v.size
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end == start
    assert v.ranges()["text"] == (0, 50_432)
    assert v.ranges()["image"] == (50_432, 66_816)
    assert (v.boi_id, v.eoi_id) == (66_816, 66_817)


def test_tokenizer_without_pad_gets_a_pad_special() -> None:
    v = VocabLayout(text_size=128, image_size=256, bos_id=0, eod_id=1)
    assert v.added_specials == ("<boi>", "<eoi>", "<pad>")
    assert v.pad_id == v.special_id("<pad>") == 128 + 256 + 2
    assert v.size == 128 + 256 + 3
    assert v.ranges()["<pad>"] == (v.pad_id, v.pad_id + 1)


def test_unknown_special_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="<img>"):
        _paper().special_id("<img>")


def test_image_token_round_trip() -> None:
    v = _paper()
    codes = np.array([0, 1, 16_383])
    tokens = v.image_token(codes)
    assert tokens.tolist() == [50_432, 50_433, 66_815]
    assert v.image_code(tokens).tolist() == codes.tolist()
    assert v.image_code(v.image_token(7)) == 7
    lo, hi = v.ranges()["image"]
    assert all(lo <= t < hi for t in tokens.tolist())


@pytest.mark.parametrize("layout", [
    _paper(),
    VocabLayout(text_size=128, image_size=256, bos_id=5, eod_id=6),
])
def test_save_load_round_trip(tmp_path: Path, layout: VocabLayout) -> None:
    path = tmp_path / "vocab.json"
    layout.save(path)
    back = VocabLayout.load(path)
    assert back == layout
    assert back.differences(layout) == []
    # the sidecar also spells out the ranges for a human reader
    assert json.loads(path.read_text())["ranges"]["image"] == list(layout.ranges()["image"])


def test_load_does_not_add_a_second_pad(tmp_path: Path) -> None:
    layout = VocabLayout(text_size=10, image_size=4, bos_id=0, eod_id=1)
    layout.save(tmp_path / "v.json")
    assert VocabLayout.load(tmp_path / "v.json").added_specials.count("<pad>") == 1


def test_check_matches_names_each_differing_range_and_both_sides() -> None:
    ckpt = _paper()
    data = _paper(image_size=8_192)
    with pytest.raises(VocabMismatchError) as e:
        ckpt.check_matches(data, mine="checkpoint run_a", theirs="data/tokens.vocab.json")
    msg = str(e.value)
    assert "checkpoint run_a" in msg and "data/tokens.vocab.json" in msg
    # theirs (the data file's) first, then mine (the checkpoint's)
    assert "(theirs vs mine)" in msg
    assert "image: [50432, 58624) vs [50432, 66816)" in msg
    assert "<boi>: [58624, 58625) vs [66816, 66817)" in msg
    assert "<eoi>: [58625, 58626) vs [66817, 66818)" in msg
    assert "text:" not in msg  # only what differs


def test_check_matches_reports_ids_and_absent_ranges() -> None:
    own_pad = _paper()
    added_pad = _paper(text_pad_id=None, bos_id=3)
    diffs = own_pad.differences(added_pad)
    assert "<pad>: absent vs [66818, 66819)" in diffs
    assert "bos_id: 0 vs 3" in diffs
    assert "pad_id: 2 vs 66818" in diffs


def test_check_matches_accepts_equal_layouts() -> None:
    _paper().check_matches(_paper(), mine="a", theirs="b")


@pytest.mark.parametrize("field, value", [("bos_id", 50_432), ("eod_id", -1), ("bos_id", 60_000)])
def test_bos_and_eod_must_be_text_ids(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{field}={value} is outside the text range"):
        _paper(**{field: value})


@pytest.mark.parametrize("text_size, image_size", [(0, 10), (10, -1)])
def test_sizes_must_be_positive(text_size: int, image_size: int) -> None:
    with pytest.raises(ValueError, match="text_size"):
        VocabLayout(text_size=text_size, image_size=image_size, bos_id=0, eod_id=0)


def test_layout_from_tokenizers(tmp_path: Path) -> None:
    """The layout reads sizes and ids from the tokenizers themselves: the text tokenizer's
    bos/eos/pad, the image tokenizer's codebook size (or image_size for text-only files)."""
    from megatron_t2i.data import synthetic
    from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
    from megatron_t2i.tokenizers.text import SentencePieceTokenizer

    corpus = synthetic.generate(64, 16, seed=0)
    text = SentencePieceTokenizer.train(corpus.captions, 96, tmp_path / "sp")
    image = KMeansPatchVQ.fit(corpus.images, codebook_size=24, patch_size=4, seed=0, iters=2)
    layout = VocabLayout.from_tokenizers(text, image)
    assert (layout.text_size, layout.image_size) == (96, 24)
    assert (layout.bos_id, layout.eod_id) == (text.bos_id, text.eos_id)
    assert layout.pad_id == (text.pad_id if text.pad_id is not None else layout.special_id("<pad>"))
    assert VocabLayout.from_tokenizers(text, image_size=24) == layout  # text-only files
    with pytest.raises(ValueError, match="image_size=25 but the image tokenizer has 24"):
        VocabLayout.from_tokenizers(text, image, image_size=25)
    with pytest.raises(ValueError, match="needs an image tokenizer or image_size"):
        VocabLayout.from_tokenizers(text)
