"""Dataset features on real token files: caption dropout, text packing, blends, exact resume,
the refusals of bad inputs before training, and a training run over a blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_t2i.config import Config, ConfigError, config_from_dict, validate
from megatron_t2i.data.blend import BlendedDataset
from megatron_t2i.data.dataset import PackedTextDataset, T2IDataset
from megatron_t2i.data.documents import make_document
from megatron_t2i.data.indexed import open_indexed, paths, write_indexed
from megatron_t2i.data.loader import build_datasets, collate, resolve_sources
from megatron_t2i.data.sampler import DataParallelSampler
from megatron_t2i.vocab import VocabLayout, VocabMismatchError

LAYOUT = VocabLayout(text_size=50, image_size=16, bos_id=1, eod_id=2, text_pad_id=3)
CODES = 4  # image codes per document


def _image_docs(n: int, word: int, seed: int = 0) -> list[np.ndarray]:
    """Documents whose captions start with `word` (which marks the prefix they come from)."""
    rng = np.random.default_rng(seed)
    return [make_document([word, *rng.integers(10, 50, rng.integers(1, 6))],
                          rng.integers(0, 16, CODES), LAYOUT) for _ in range(n)]


def _write(prefix: Path, docs, mode: str = "conditional", layout: VocabLayout = LAYOUT,
           image: dict | None = None) -> str:
    image = image if image is not None else {"identity": "vq", "tokens_per_image": CODES}
    write_indexed(prefix, docs, layout, meta={
        "mode": mode, "text_tokenizer": {"identity": "sp"},
        "image_tokenizer": None if mode == "text" else image})
    return str(prefix)


def _cfg(**data) -> Config:
    return config_from_dict({
        "model": {"seq_length": 16},
        "data": {"text_vocab_size": 50, "image_vocab_size": 16,
                 "image_tokens_per_sample": CODES, "split": "90,10,0", **data},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "seed": 5}})


def _ids(sampler, steps: int) -> list[int]:
    return sum((next(sampler) for _ in range(steps)), [])


# ---- caption dropout --------------------------------------------------------------------

def test_caption_dropout_rate_determinism_and_form(tmp_path):
    docs = _image_docs(2000, word=7)
    indexed = open_indexed(_write(tmp_path / "a", docs), LAYOUT)
    make = lambda p, seed=0: T2IDataset(indexed, LAYOUT, 16, range(2000),  # noqa: E731
                                        caption_dropout=p, seed=seed)
    ds = make(0.25)
    rate = ds.dropped(0).mean()
    assert 0.22 < rate < 0.28
    assert np.array_equal(make(0.25).dropped(0), ds.dropped(0))  # a pure function of the seed
    assert not np.array_equal(ds.dropped(1), ds.dropped(0))  # redrawn each epoch
    assert not np.array_equal(make(0.25, seed=1).dropped(0), ds.dropped(0))
    i = int(np.flatnonzero(ds.dropped(0))[0])
    kept = int(np.flatnonzero(~ds.dropped(0))[0])
    dropped = ds[i]["tokens"].tolist()
    assert dropped[:2] == [LAYOUT.bos_id, LAYOUT.boi_id]  # [bos] [boi] codes [eoi]
    assert dropped[2:2 + CODES] == (docs[i][-1 - CODES:-1]).tolist()
    assert ds[kept]["tokens"].tolist()[:2] == [LAYOUT.bos_id, 7]
    assert ds[2000 + i]["tokens"].tolist()[1] == (LAYOUT.boi_id if ds.dropped(1)[i] else 7)
    assert make(0.0)[i]["tokens"].tolist()[1] == 7
    with pytest.raises(ValueError, match="caption_dropout"):
        make(1.0)


# ---- packing of text-only documents --------------------------------------------------------

def test_text_documents_are_packed_gpt_style(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.array([1, *rng.integers(10, 50, rng.integers(1, 12)), 2]) for _ in range(40)]
    indexed = open_indexed(_write(tmp_path / "t", docs, mode="text"), LAYOUT)
    ds = PackedTextDataset(indexed, LAYOUT, seq_length=8, document_ids=range(40), seed=3)
    stream = np.concatenate([docs[d] for d in ds.documents])
    assert sorted(ds.documents.tolist()) == list(range(40))
    assert len(ds) == (len(stream) - 1) // 8
    for k in (0, 1, len(ds) - 1):
        item = ds[k]
        assert item["tokens"].tolist() == stream[8 * k:8 * k + 8].tolist()
        assert item["labels"].tolist() == stream[8 * k + 1:8 * k + 9].tolist()
        assert item["loss_mask"].sum() == 8 and item["modality"].sum() == 0
    assert ds[len(ds)]["tokens"].tolist() == ds[0]["tokens"].tolist()  # next epoch wraps


# ---- blends ---------------------------------------------------------------------------------

def test_blend_proportions_within_two_percent_over_10000_samples(tmp_path):
    sizes, words, weights = (300, 37, 500), (7, 8, 9), (0.5, 0.3, 0.2)
    datasets = [T2IDataset(open_indexed(_write(tmp_path / f"p{w}", _image_docs(n, w)), LAYOUT),
                           LAYOUT, 16, range(n)) for n, w in zip(sizes, words)]
    blend = BlendedDataset(datasets, weights, seed=1, size=sum(sizes))
    sampler = DataParallelSampler(len(blend), 0, 10, 0, 1, seed=2)
    ids = _ids(sampler, 1000)  # 10,000 samples, over 11+ blend epochs
    first_tokens = [blend[i]["tokens"][1].item() for i in ids]
    for word, weight in zip(words, weights):
        share = first_tokens.count(word) / len(ids)
        assert abs(share - weight) < 0.02, (word, share, weight)
    # the small dataset is repeated evenly: each document drawn 81 +- 1 times
    small = [blend.source_of(i) == 1 for i in ids]
    assert sum(small) == pytest.approx(3000, abs=200)


def test_resume_is_exact_through_blend_dropout_and_packing(tmp_path):
    rng = np.random.default_rng(1)
    text = [np.array([1, *rng.integers(10, 50, 9), 2]) for _ in range(30)]
    cfg = _cfg(data_paths=[_write(tmp_path / "a", _image_docs(60, 7)),
                           _write(tmp_path / "b", _image_docs(25, 8, seed=1)),
                           _write(tmp_path / "t", text, mode="text")],
               data_weights=[0.5, 0.3, 0.2], caption_dropout=0.3)
    sources, layout = resolve_sources(cfg)
    train, _ = build_datasets(cfg, sources, layout)

    def stream(consumed: int, steps: int, rank: int) -> list[torch.Tensor]:
        sampler = DataParallelSampler(len(train), consumed, 4, rank, 2, seed=cfg.train.seed)
        return [collate([train[i] for i in next(sampler)], torch.device("cpu"))["tokens"]
                for _ in range(steps)]

    for rank in (0, 1):
        full = stream(0, 40, rank)  # several epochs of the blend
        for steps in (1, 13, 29):
            resumed = stream(steps * 8, 40 - steps, rank)
            assert all(torch.equal(a, b) for a, b in zip(full[steps:], resumed))
    starts = {t[1].item() for t in torch.cat(stream(0, 40, 0))}
    assert {7, 8, LAYOUT.boi_id} <= starts  # both image prefixes, and dropped captions


# ---- bad inputs, refused before training ----------------------------------------------------

@pytest.fixture
def good(tmp_path) -> str:
    return _write(tmp_path / "good", _image_docs(40, 7))


def test_missing_prefix_is_named(good, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin not found.*data_paths"):
        resolve_sources(_cfg(data_paths=[good, str(tmp_path / "nothing")]))


def test_truncated_bin_is_named(good):
    cfg = _cfg(data_path=good)
    sources, layout = resolve_sources(cfg)
    bin_path = paths(good)["bin"]
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"good\.bin: .* truncated"):
        build_datasets(cfg, sources, layout)


def test_corrupt_idx_header_and_truncated_idx_are_named(good, tmp_path):
    cfg = _cfg(data_path=good)
    sources, layout = resolve_sources(cfg)
    idx = paths(good)["idx"]
    blob = idx.read_bytes()
    idx.write_bytes(b"GARBAGE!!" + blob[9:])
    with pytest.raises(ValueError, match=r"good\.idx: not a megatron-core index file"):
        build_datasets(cfg, sources, layout)
    idx.write_bytes(blob[:-16])
    with pytest.raises(ValueError, match=r"good\.idx: truncated"):
        build_datasets(cfg, sources, layout)


def test_layout_disagreeing_with_the_config_is_named(good, tmp_path):
    with pytest.raises(VocabMismatchError, match=r"data.image_vocab_size=32 .*good.vocab.json"):
        resolve_sources(_cfg(data_path=good, image_vocab_size=32))
    with pytest.raises(VocabMismatchError, match=r"image_tokens_per_sample=9 .*good"):
        resolve_sources(_cfg(data_path=good, image_tokens_per_sample=9))
    other = VocabLayout(text_size=50, image_size=17, bos_id=1, eod_id=2, text_pad_id=3)
    odd = _write(tmp_path / "odd", [[1, 2]], mode="text", layout=other)
    with pytest.raises(VocabMismatchError, match=r"odd.vocab.json differs from .*good.vocab"):
        resolve_sources(_cfg(data_paths=[good, odd]))
    other_vq = _write(tmp_path / "vq2", _image_docs(5, 8),
                      image={"identity": "another", "tokens_per_image": CODES})
    with pytest.raises(VocabMismatchError, match=r"vq2.vocab.json was written with another "
                                                 r"image_tokenizer"):
        resolve_sources(_cfg(data_paths=[good, other_vq]))


def test_data_config_is_validated():
    for data, match in (({"data_path": "a", "data_paths": ["b"]}, "not both"),
                        ({"data_paths": ["a", "b"], "data_weights": [1.0]}, "2 data.data_paths"),
                        ({"data_paths": ["a"], "data_weights": [0.0]}, "positive"),
                        ({"caption_dropout": 1.0}, "caption_dropout")):
        with pytest.raises(ConfigError, match=match):
            validate(_cfg(**data), world_size=1)


# ---- the trainer over a blend -----------------------------------------------------------------

def test_training_runs_over_a_blend_with_caption_dropout(tmp_path, corpus_dir):
    from conftest import read_metrics, run_train

    rng = np.random.default_rng(0)
    layout = VocabLayout(text_size=128, image_size=256, bos_id=1, eod_id=2, text_pad_id=3)
    docs = [make_document(rng.integers(4, 128, 10), rng.integers(0, 256, 64), layout)
            for _ in range(80)]
    texts = [np.array([1, *rng.integers(4, 128, 30), 2]) for _ in range(60)]
    meta = {"text_tokenizer": {"identity": "sp"}}
    write_indexed(tmp_path / "img", docs, layout, meta={**meta, "mode": "conditional"})
    write_indexed(tmp_path / "txt", texts, layout, meta={**meta, "mode": "text"})
    run = tmp_path / "run"
    run_train(run, corpus_dir, overrides=[
        f"data.data_paths=[{tmp_path / 'img'},{tmp_path / 'txt'}]", "data.data_weights=[3,1]",
        "data.caption_dropout=0.2", "train.train_iters=2"])
    losses = [m["loss"] for m in read_metrics(run)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    resolved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert resolved["data_weights"] == [3.0, 1.0] and resolved["caption_dropout"] == 0.2
