"""The embedded demo data path, end to end on CPU with the real components (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_t2i.config import ConfigError, DataConfig
from megatron_t2i.data import synthetic
from megatron_t2i.data.dataset import T2IDataset, split_documents
from megatron_t2i.data.demo import prepare_demo_corpus
from megatron_t2i.data.documents import make_document
from megatron_t2i.data.indexed import open_indexed, paths, read_sidecar, write_indexed
from megatron_t2i.data.sampler import DataParallelSampler
from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
from megatron_t2i.tokenizers.text import SentencePieceTokenizer
from megatron_t2i.vocab import VocabLayout, VocabMismatchError

SEED = 7


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), synthetic_samples=96)
    return cfg, prepare_demo_corpus(cfg, SEED)


@pytest.fixture
def layout() -> VocabLayout:
    return VocabLayout(text_size=16, image_size=8, bos_id=1, eod_id=2, text_pad_id=3)


# ---- synthetic corpus and tokenizers ------------------------------------------------------

def test_synthetic_corpus_is_deterministic_and_readable_back():
    a, b = synthetic.generate(60, seed=3), synthetic.generate(60, seed=3)
    assert a.images.shape == (60, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert synthetic.generate(60, seed=4).captions != a.captions
    for image, caption, objects in zip(a.images, a.captions, a.objects):
        assert synthetic.describe(image) == objects
        assert synthetic.caption(objects) == caption


def test_sentencepiece_vocab_size_is_exact_and_round_trips(tmp_path):
    captions = synthetic.generate(300, seed=0).captions
    for size in (128, 300):  # 300 is more than BPE can merge here: filled with unused pieces
        tok = SentencePieceTokenizer.train(captions, size, tmp_path / f"sp{size}")
        assert tok.vocab_size == size
        assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
        ids = tok.encode(captions[0])
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert all(tok.decode(tok.encode(c)) == c for c in captions)
        again = SentencePieceTokenizer.load(tmp_path / f"sp{size}.model")
        assert again.identity() == tok.identity() and again.encode(captions[1]) == \
            tok.encode(captions[1])


def test_kmeans_vq_shapes_determinism_save_load_and_quality(tmp_path):
    images = synthetic.generate(200, seed=1).images
    vq = KMeansPatchVQ.fit(images, codebook_size=64, patch_size=4, seed=0, iters=10)
    codes = vq.encode(images)
    assert codes.shape == (200, 8, 8) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 64 and vq.grid_size == 8
    recon = vq.decode(codes)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    mse = ((recon.astype(np.float64) - images) ** 2).mean()
    baseline = ((images.mean(0) - images) ** 2).mean()  # the mean image, whatever the caption
    assert mse < 0.25 * baseline
    again = KMeansPatchVQ.fit(images, codebook_size=64, patch_size=4, seed=0, iters=10)
    assert again.identity() == vq.identity()
    vq.save(tmp_path / "vq.npz")
    loaded = KMeansPatchVQ.load(tmp_path / "vq.npz")
    assert loaded.identity() == vq.identity() and np.array_equal(loaded.encode(images), codes)


def test_kmeans_vq_on_noise_is_deterministic():
    noise = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    a = KMeansPatchVQ.fit(noise, codebook_size=16, patch_size=2, seed=5, iters=4)
    b = KMeansPatchVQ.fit(noise, codebook_size=16, patch_size=2, seed=5, iters=4)
    assert np.array_equal(a.codebook, b.codebook) and len(np.unique(a.encode(noise))) > 8


# ---- the demo corpus end to end ----------------------------------------------------------

def test_demo_round_trip_corpus_to_samples(demo):
    cfg, (prefix, layout, text, image) = demo
    assert layout == VocabLayout.from_tokenizers(text, image_size=cfg.image_vocab_size)
    assert (layout.text_size, layout.image_size) == (cfg.text_vocab_size, cfg.image_vocab_size)
    corpus = synthetic.generate(cfg.synthetic_samples, cfg.synthetic_image_size, SEED)
    codes = image.encode(corpus.images)
    indexed = open_indexed(prefix, layout)
    dataset = T2IDataset(indexed, layout, seq_length=128, document_ids=[0, 5, 95])
    for i, doc in enumerate([0, 5, 95]):
        expected = make_document(text.encode(corpus.captions[doc]), codes[doc], layout)
        sample = np.full(129, layout.pad_id)
        sample[:len(expected)] = expected
        item = dataset[i]
        assert np.array_equal(item["tokens"].numpy(), sample[:-1])
        assert np.array_equal(item["labels"].numpy(), sample[1:])
    sidecar = read_sidecar(prefix)
    assert sidecar["text_tokenizer"]["identity"] == text.identity()
    assert sidecar["image_tokenizer"]["identity"] == image.identity()
    assert sidecar["max_caption_tokens"] <= 128 + 1 - 3 - cfg.image_tokens_per_sample


def test_megatron_core_reads_the_token_files(demo):
    cfg, (prefix, layout, text, _) = demo
    ds = IndexedDataset(prefix)
    assert len(ds) == cfg.synthetic_samples
    assert list(ds.document_indices) == list(range(cfg.synthetic_samples + 1))
    doc = ds[3]
    assert doc.dtype == np.int32 and doc[0] == layout.bos_id and doc[-1] == layout.eoi_id
    assert int((doc == layout.boi_id).sum()) == 1
    assert len(doc) - 1 - int(np.flatnonzero(doc == layout.boi_id)[0]) - 1 == 64


def test_demo_corpus_is_reused_and_regenerated_on_change(demo, capsys):
    cfg, (prefix, _, text, image) = demo
    again = prepare_demo_corpus(cfg, SEED)
    assert again[0] == prefix and again[2].identity() == text.identity()
    assert again[3].identity() == image.identity() and "reusing" in capsys.readouterr().out
    other = DataConfig(**{**vars(cfg), "image_vocab_size": 32})
    assert prepare_demo_corpus(other, SEED)[0] != prefix


def test_demo_refuses_mismatched_image_tokens(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), image_tokens_per_sample=16)
    with pytest.raises(ConfigError, match="image_tokens_per_sample=16"):
        prepare_demo_corpus(cfg, SEED)


# ---- dataset masks, truncation, splits ---------------------------------------------------

def _tiny_files(tmp_path, layout):
    docs = [make_document([5, 6, 7], [0, 1, 2, 3], layout),
            make_document([], [4, 5, 6, 7], layout)]
    write_indexed(tmp_path / "tiny", docs, layout, meta={"note": "test"})
    return open_indexed(tmp_path / "tiny", layout), docs


def test_loss_mask_and_modality(tmp_path, layout):
    indexed, docs = _tiny_files(tmp_path, layout)
    item = T2IDataset(indexed, layout, seq_length=16, document_ids=[0])[0]
    # doc 0: bos 5 6 7 boi c0 c1 c2 c3 eoi (10 tokens) -> 9 real targets, then padding
    assert item["loss_mask"].tolist() == [1.0] * 9 + [0.0] * 7
    assert item["modality"].tolist() == [0] * 4 + [1] * 5 + [0] * 7
    assert item["labels"][:9].tolist() == docs[0][1:].tolist()
    assert item["tokens"].dtype == item["labels"].dtype == item["modality"].dtype
    no_caption = T2IDataset(indexed, layout, 16, [0], loss_on_captions=False)[0]
    assert no_caption["loss_mask"].tolist() == [0.0] * 4 + [1.0] * 5 + [0.0] * 7


def test_long_caption_is_truncated_keeping_the_image(tmp_path, layout):
    indexed, docs = _tiny_files(tmp_path, layout)
    item = T2IDataset(indexed, layout, seq_length=7, document_ids=[0])[0]
    sample = item["tokens"].tolist() + item["labels"][-1:].tolist()
    assert sample == [layout.bos_id, 5] + docs[0][4:].tolist()
    with pytest.raises(ValueError, match="seq_length"):
        T2IDataset(indexed, layout, seq_length=4, document_ids=[0])[0]


def test_split_documents_is_disjoint_covering_and_deterministic():
    train, valid, test = split_documents(1000, "90,5,5", seed=1)
    assert (len(train), len(valid), len(test)) == (900, 50, 50)
    assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(1000))
    again = split_documents(1000, "90,5,5", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again))
    with pytest.raises(ConfigError):
        split_documents(10, "90,5")


# ---- sampler ---------------------------------------------------------------------------

def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_resumes_exactly():
    args = dict(num_samples=50, micro_batch_size=3, data_parallel_rank=1,
                data_parallel_size=2, seed=11)
    stream = _take(DataParallelSampler(consumed_samples=0, **args), 40)  # spans 5 epochs
    for steps in (1, 7, 8, 9, 23):
        resumed = DataParallelSampler(consumed_samples=steps * 6, **args)
        assert _take(resumed, 40 - steps) == stream[steps:]
    with pytest.raises(ValueError, match="multiple"):
        DataParallelSampler(consumed_samples=5, **args)


def test_sampler_ranks_are_disjoint_and_cover_each_epoch():
    num, mbs, dp = 50, 3, 2  # 8 steps of 6 per epoch; 2 samples dropped
    ranks = [DataParallelSampler(num, 0, mbs, r, dp, seed=2) for r in range(dp)]
    for _epoch in range(2):
        seen = [sum(_take(s, 8), []) for s in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 48
    assert ranks[0].epoch == 2
    first = sum(_take(DataParallelSampler(num, 0, mbs, 0, dp, seed=2), 8), [])
    second = sum(_take(DataParallelSampler(num, 48, mbs, 0, dp, seed=2), 8), [])
    assert first != second  # a new permutation each epoch


# ---- refusals ---------------------------------------------------------------------------

def test_sidecar_layout_mismatch_names_the_file(tmp_path, layout):
    _tiny_files(tmp_path, layout)
    other = VocabLayout(text_size=16, image_size=9, bos_id=1, eod_id=2, text_pad_id=3)
    with pytest.raises(VocabMismatchError, match="tiny.vocab.json") as err:
        open_indexed(tmp_path / "tiny", other)
    assert "image" in str(err.value) and "the training config" in str(err.value)


def test_truncated_bin_is_refused_naming_the_file(tmp_path, layout):
    _tiny_files(tmp_path, layout)
    bin_path = paths(tmp_path / "tiny")["bin"]
    bin_path.write_bytes(bin_path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="tiny.bin.*truncated"):
        open_indexed(tmp_path / "tiny", layout)


def test_missing_files_are_named(tmp_path, layout):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        open_indexed(tmp_path / "nothing", layout)
    _tiny_files(tmp_path, layout)
    paths(tmp_path / "tiny")["vocab.json"].unlink()
    with pytest.raises(FileNotFoundError, match="tiny.vocab.json"):
        open_indexed(tmp_path / "tiny", layout)


def test_write_refuses_ids_outside_the_layout(tmp_path, layout):
    with pytest.raises(ValueError, match="outside"):
        write_indexed(tmp_path / "bad", [[1, layout.size]], layout)


def test_failed_generation_leaves_no_files(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), text_vocab_size=10, synthetic_samples=20)
    with pytest.raises(ValueError, match="sentencepiece"):
        prepare_demo_corpus(cfg, SEED)
    assert list(tmp_path.iterdir()) == []
