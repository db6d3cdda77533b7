"""The VQ autoencoder image tokenizer: shapes, determinism, codebook use, persistence, caching
and a round trip through the token files (images -> preprocess -> .bin/.idx -> codes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_t2i.data import synthetic
from megatron_t2i.data.indexed import read_sidecar
from megatron_t2i.data.preprocess import Settings, preprocess
from megatron_t2i.eval.loading import _image_kind
from megatron_t2i.tokenizers import factory, vqvae
from megatron_t2i.tokenizers.text import SentencePieceTokenizer
from megatron_t2i.vocab import VocabLayout

TINY = dict(codebook_size=32, downsample=4, steps=60, batch_size=16, seed=0, code_dim=8, lr=5e-3,
            width=16)


@pytest.fixture(scope="module")
def shapes() -> synthetic.SyntheticCorpus:
    return synthetic.generate(48, 64, seed=0)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> tuple[vqvae.VQVAE, Path]:
    path = tmp_path_factory.mktemp("vq") / "vq.safetensors"
    model = vqvae.train_vqvae(shapes.images, **TINY, cache=path)
    return model, path


def test_encode_decode_shapes_and_ranges(trained, shapes):
    tok = vqvae.VQVAETokenizer(trained[0])
    codes = tok.encode(shapes.images[:5])
    assert codes.shape == (5, 16, 16) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 32
    assert (tok.grid_size, tok.tokens_per_image, tok.image_size) == (16, 256, 64)
    images = tok.decode(codes)
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="codes outside"):
        tok.decode(np.full((1, 16, 16), 32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        tok.encode(shapes.images[:2, :32, :32])


def test_eight_by_eight_codes_for_the_ablation(shapes):
    model = vqvae.train_vqvae(shapes.images[:16], **{**TINY, "downsample": 8, "steps": 2})
    tok = vqvae.VQVAETokenizer(model)
    assert tok.encode(shapes.images[:3]).shape == (3, 8, 8)
    assert tok.decode(np.zeros((2, 8, 8), np.int64)).shape == (2, 64, 64, 3)


def test_training_is_deterministic_for_a_seed(trained, shapes):
    tok = vqvae.VQVAETokenizer(trained[0])
    assert np.array_equal(tok.encode(shapes.images), tok.encode(shapes.images))
    again = vqvae.train_vqvae(shapes.images, **{**TINY, "steps": 10})
    same = vqvae.train_vqvae(shapes.images, **{**TINY, "steps": 10})
    other = vqvae.train_vqvae(shapes.images, **{**TINY, "steps": 10, "seed": 1})
    identity = vqvae.VQVAETokenizer(again).identity()
    assert vqvae.VQVAETokenizer(same).identity() == identity
    assert vqvae.VQVAETokenizer(other).identity() != identity


def test_learns_to_reconstruct_and_uses_its_codebook(trained, shapes):
    tok = vqvae.VQVAETokenizer(trained[0])
    mse = vqvae.reconstruction_mse(tok, shapes.images)
    baseline = float(((shapes.images / 255 - shapes.images.mean(0) / 255) ** 2).mean())
    assert mse < 0.5 * baseline  # far better than the mean image
    usage = vqvae.codebook_usage(tok, shapes.images[:8])
    assert usage["used"] + usage["dead_codes"] == 32
    assert usage["used"] >= 8  # dead-code restarts keep codes in use
    assert 1.0 < usage["perplexity"] <= usage["used"]
    assert 0 < usage["top_share"] < 1
    record = trained[0].training_record
    assert record["train_images"] == 48 and record["settings"]["steps"] == 60


def test_codebook_usage_counts_codes(shapes):
    class Fixed(vqvae.VQVAETokenizer):  # a real tokenizer whose codes we choose
        def encode(self, images):
            return np.array([[[0, 0], [1, 1]], [[0, 0], [2, 3]]])

    model = vqvae.VQVAE(vqvae.VQVAEConfig(codebook_size=8))
    usage = vqvae.codebook_usage(Fixed(model), shapes.images[:2])
    p = np.array([4, 2, 1, 1]) / 8
    assert usage["used"] == 4 and usage["dead_codes"] == 4 and usage["top_share"] == 0.5
    assert usage["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_saved_file_loads_through_the_factory(trained, shapes):
    model, path = trained
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert json.loads(path.with_suffix(".json").read_text())["config"]["codebook_size"] == 32
    loaded = factory.load_image_tokenizer("vqvae", path)
    assert loaded.identity() == vqvae.VQVAETokenizer(model).identity()
    assert np.array_equal(loaded.encode(shapes.images[:4]),
                          vqvae.VQVAETokenizer(model).encode(shapes.images[:4]))
    assert _image_kind(path) == "vqvae"  # generation finds the kind from the file


def test_rerun_reuses_the_cached_model(trained, shapes):
    model, path = trained
    mtime = path.stat().st_mtime_ns
    again = vqvae.train_vqvae(shapes.images, **TINY, cache=path)
    assert again.from_cache and path.stat().st_mtime_ns == mtime
    assert vqvae.VQVAETokenizer(again).identity() == vqvae.VQVAETokenizer(model).identity()
    changed = shapes.images.copy()
    changed[0, 0, 0, 0] ^= 1  # other images: trained afresh, not reused
    other = path.with_name("other.safetensors")
    fresh = vqvae.train_vqvae(changed, **{**TINY, "steps": 1}, cache=other)
    assert not fresh.from_cache and other.is_file()
    assert not vqvae.train_vqvae(shapes.images, **{**TINY, "steps": 1}, cache=other).from_cache
    copy = path.with_name("copy.safetensors")
    shutil.copyfile(path, copy)
    threads = torch.get_num_threads()
    try:  # another thread count trains another model: not reused either
        torch.set_num_threads(threads + 1)
        assert not vqvae.train_vqvae(shapes.images, **{**TINY, "steps": 1}, cache=copy).from_cache
    finally:
        torch.set_num_threads(threads)


def test_bad_files_are_one_line_errors(trained, tmp_path):
    _, path = trained
    with pytest.raises(FileNotFoundError, match="nope.safetensors not found"):
        vqvae.load_vqvae(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes())
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["width"] = 12
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its config") as e:
        vqvae.load_vqvae(bad)
    assert "\n" not in str(e.value)


def test_codes_round_trip_through_the_token_files(trained, shapes, tmp_path):
    _, path = trained
    (tmp_path / "img").mkdir()
    records = []
    for i, (image, caption) in enumerate(zip(shapes.images[:12], shapes.captions)):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        records.append(json.dumps({"image": f"img/{i}.png", "caption": caption}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(records) + "\n")
    text = SentencePieceTokenizer.train(shapes.captions, 64, tmp_path / "sp")
    prefix = tmp_path / "tokens"
    preprocess(Settings((str(tmp_path / "pairs.jsonl"),), str(prefix),
                        text_tokenizer=("sentencepiece", str(tmp_path / "sp.model")),
                        image_tokenizer=("vqvae", str(path)), progress=False))
    side = read_sidecar(prefix)
    assert side["image_tokenizer"]["kind"] == "vqvae"
    assert side["image_tokenizer"]["tokens_per_image"] == 256
    layout = VocabLayout.from_dict(side["layout"])
    docs = IndexedDataset(str(prefix))
    expected = factory.load_image_tokenizer("vqvae", path).encode(shapes.images[:12])
    assert len(docs) == 12
    for i in range(12):
        doc = docs[i].tolist()
        start = doc.index(layout.boi_id) + 1
        image_tokens = np.array(doc[start:start + 256])
        assert doc[start + 256] == layout.eoi_id
        assert doc[1:start - 1] == text.encode(shapes.captions[i])
        assert np.array_equal(layout.image_code(image_tokens), expected[i].reshape(-1))


def test_train_vqvae_tool_prints_figures_and_reuses(shapes, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_vqvae", Path(__file__).resolve().parents[1] / "tools/train_vqvae.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "img").mkdir()
    lines = []
    for i, image in enumerate(shapes.images[:8]):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": shapes.captions[i]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "vq.safetensors"),
            "--steps", "3", "--batch-size", "4", "--codebook-size", "16"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    first = json.loads(out[out.index("{\n"):])  # the figures, after the step lines
    assert not first["reused"] and first["train_images"] == 8
    assert first["used_codes"] + first["dead_codes"] == 16
    assert 0 < first["reconstruction_mse_train"] < 1 and first["codebook_perplexity"] >= 1
    assert tool.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["reused"]
    with pytest.raises(SystemExit) as e:
        tool.main(argv[:3] + [str(tmp_path / "vq.pt")])
    assert e.value.code == 2
