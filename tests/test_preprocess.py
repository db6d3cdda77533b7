"""Preprocessing: image-caption corpora (jsonl, webdataset tar, parquet) -> token files,
with the real tokenizers (sentencepiece, a tokenizer.json, the k-means VQ) and real files."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_t2i.data import synthetic
from megatron_t2i.data.dataset import T2IDataset
from megatron_t2i.data.indexed import open_indexed, paths, read_sidecar
from megatron_t2i.data.preprocess import Settings, load_image, preprocess, resize_center_crop
from megatron_t2i.tokenizers import factory
from megatron_t2i.tokenizers.hf import HFTokenizer
from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
from megatron_t2i.tokenizers.text import SentencePieceTokenizer
from megatron_t2i.vocab import VocabLayout

REPO = Path(__file__).resolve().parents[1]
N = 24  # good records per input file


# ---- fixtures: a tiny corpus in three formats, plus bad records ---------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data = synthetic.generate(N, 32, seed=0)
    pngs = [_png(im) for im in data.images]
    (root / "img").mkdir()
    for i, png in enumerate(pngs):
        (root / "img" / f"{i}.png").write_bytes(png)
    (root / "img" / "corrupt.png").write_bytes(pngs[0][:60])  # a PNG cut short
    lines = [json.dumps({"image": f"img/{i}.png", "caption": c})
             for i, c in enumerate(data.captions)]
    lines[3:3] = ["{not json", json.dumps({"image": "img/nope.png", "caption": "a red circle"}),
                  json.dumps({"image": "img/1.png", "caption": "   "}),
                  json.dumps({"image": "img/corrupt.png", "caption": "a blue square"})]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i, (png, cap) in enumerate(zip(pngs, data.captions)):
            text = (f"{i:04d}.txt", cap.encode()) if i % 2 else \
                (f"{i:04d}.json", json.dumps({"caption": cap}).encode())
            for name, blob in ((f"{i:04d}.png", png), text):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    table = pa.table({"image": pngs, "caption": data.captions})
    pq.write_table(table, root / "pairs.parquet", row_group_size=10)  # 3 row groups
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": c + " and more words"}) + "\n"
                                              for c in data.captions[:10]))
    text = SentencePieceTokenizer.train(data.captions, 96, root / "sp")
    vq = KMeansPatchVQ.fit(data.images, codebook_size=32, patch_size=4, seed=0, iters=3)
    vq.save(root / "vq.npz")
    return root, data, text, vq


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _settings(root: Path, inputs: list[str], out: str, **kw) -> Settings:
    kw.setdefault("image_tokenizer", ("kmeans", str(root / "vq.npz")))
    return Settings(tuple(str(root / i) for i in inputs), str(root / out),
                    text_tokenizer=kw.pop("text_tokenizer", ("auto", str(root / "sp.model"))),
                    progress=False, **kw)


def _expected(text, vq, layout: VocabLayout, captions, images) -> list[list[int]]:
    codes = vq.encode(images).reshape(len(images), -1)
    return [[layout.bos_id, *text.encode(c), layout.boi_id,
             *(int(k) + layout.text_size for k in cs), layout.eoi_id]
            for c, cs in zip(captions, codes)]


def _docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


# ---- images and captions -> files -> samples -------------------------------------------------

def test_jsonl_to_dataset_sample_equals_expected_tokens(corpus):
    root, data, text, vq = corpus
    summary = preprocess(_settings(root, ["pairs.jsonl"], "jsonl", workers=2))
    assert (summary.records, summary.documents) == (N + 4, N)
    assert summary.skipped == {"bad record": 1, "missing image": 1, "empty caption": 1,
                               "unreadable image": 1}
    skipped = [json.loads(x) for x in Path(f"{root}/jsonl.skipped.jsonl").read_text().split("\n")
               if x]
    assert sorted(s["reason"] for s in skipped) == sorted(summary.skipped)
    assert any("nope.png" in s["detail"] for s in skipped)

    layout = VocabLayout(text_size=96, image_size=32, bos_id=1, eod_id=2, text_pad_id=3)
    expected = _expected(text, vq, layout, data.captions, data.images)
    dataset = T2IDataset(open_indexed(root / "jsonl", layout), layout, seq_length=120,
                         document_ids=range(N))
    for i in (0, 5, N - 1):
        sample = expected[i] + [layout.pad_id] * (121 - len(expected[i]))
        assert dataset[i]["tokens"].tolist() == sample[:-1]
        assert dataset[i]["labels"].tolist() == sample[1:]
    assert _docs(root / "jsonl") == expected  # megatron-core's IndexedDataset reads them


def test_sidecar_records_layout_tokenizers_and_counts(corpus):
    root, _, text, vq = corpus
    preprocess(_settings(root, ["pairs.jsonl"], "side"))
    side = read_sidecar(root / "side")
    assert VocabLayout.from_dict(side["layout"]).size == 96 + 32 + 2
    assert side["text_tokenizer"] == {"kind": "sentencepiece", "path": str(root / "sp.model"),
                                      "identity": text.identity(), "vocab_size": 96}
    assert side["image_tokenizer"]["identity"] == vq.identity()
    assert side["image_tokenizer"]["tokens_per_image"] == 64
    assert (side["num_documents"], side["records"], side["mode"]) == (N, N + 4, "conditional")
    assert side["num_tokens"] == sum(map(len, _docs(root / "side")))
    assert 0 < side["mean_caption_tokens"] <= side["max_caption_tokens"]
    assert len(side["skipped_examples"]) == 4


def test_tar_and_parquet_give_the_jsonl_documents_and_workers_do_not_matter(corpus):
    root, _, _, _ = corpus
    preprocess(_settings(root, ["pairs.jsonl"], "j"))
    reference = _docs(root / "j")
    for name in ("shard-000.tar", "pairs.parquet"):
        summary = preprocess(_settings(root, [name], name.split(".")[0]))
        assert summary.skipped == {} and _docs(root / name.split(".")[0]) == reference
    inputs = ["pairs.jsonl", "shard-000.tar", "pairs.parquet"]  # 5 tasks: 1 + 1 + 3 row groups
    one = preprocess(_settings(root, inputs, "all1", workers=1))
    three = preprocess(_settings(root, inputs, "all3", workers=3))
    assert one.documents == three.documents == 3 * N
    for ext in ("bin", "idx"):
        assert paths(root / "all1")[ext].read_bytes() == paths(root / "all3")[ext].read_bytes()
    assert _docs(root / "all1") == reference * 3


def test_unconditional_and_text_modes(corpus):
    root, data, text, vq = corpus
    preprocess(_settings(root, ["pairs.parquet"], "uncond", mode="unconditional"))
    layout = VocabLayout(text_size=96, image_size=32, bos_id=1, eod_id=2, text_pad_id=3)
    expected = _expected(text, vq, layout, [""] * N, data.images)
    assert _docs(root / "uncond") == expected
    assert VocabLayout.from_dict(read_sidecar(root / "uncond")["layout"]) == layout

    preprocess(_settings(root, ["texts.jsonl"], "text", mode="text", image_tokenizer=None,
                         image_vocab_size=32))
    side = read_sidecar(root / "text")
    assert VocabLayout.from_dict(side["layout"]) == layout  # blends with the image files
    assert side["mode"] == "text" and side["image_tokenizer"] is None
    assert _docs(root / "text")[0] == [1, *text.encode(data.captions[0] + " and more words"), 2]
    with pytest.raises(ValueError, match="image_vocab_size"):
        preprocess(_settings(root, ["texts.jsonl"], "t2", mode="text", image_tokenizer=None))


def test_images_are_resized_and_centre_cropped():
    wide = np.zeros((40, 80, 3), np.uint8)  # red | green (middle half) | blue
    wide[:, :20], wide[:, 20:60], wide[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = resize_center_crop(Image.fromarray(wide), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out[:, 2:-2].astype(int) - (0, 255, 0)).max() <= 2  # only the middle kept
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    assert np.abs(resize_center_crop(Image.fromarray(tall), 16)[2:-2].astype(int)
                  - (0, 255, 0)).max() <= 2
    grey = Image.fromarray(np.full((20, 20), 128, np.uint8)).convert("L")
    buf = io.BytesIO()
    grey.save(buf, format="JPEG")
    rgb = load_image(buf.getvalue(), 8)  # greyscale JPEG -> RGB at the tokenizer's size
    assert rgb.shape == (8, 8, 3) and abs(int(rgb.mean()) - 128) <= 2


def test_bad_inputs_are_refused_naming_the_file(corpus, tmp_path):
    root, _, _, _ = corpus
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess(_settings(root, ["missing.jsonl"], "x"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="a.csv: unknown format"):
        preprocess(Settings((str(tmp_path / "a.csv"),), str(tmp_path / "x"),
                            text_tokenizer=("auto", str(root / "sp.model")),
                            image_tokenizer=("kmeans", str(root / "vq.npz")), progress=False))
    with pytest.raises(ValueError, match=r"pairs.parquet: no column \['picture'\]"):
        preprocess(_settings(root, ["pairs.parquet"], "x", image_key="picture"))
    (tmp_path / "bad.jsonl").write_text("{oops\n\n[1, 2]\n")
    with pytest.raises(ValueError, match="no document written.*bad record"):
        preprocess(Settings((str(tmp_path / "bad.jsonl"),), str(tmp_path / "x"),
                            text_tokenizer=("auto", str(root / "sp.model")),
                            image_tokenizer=("kmeans", str(root / "vq.npz")), progress=False))


# ---- text tokenizers: tokenizer.json, the factory, the tools ---------------------------------

@pytest.fixture(scope="module")
def hf_json(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root, data, _, _ = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>",
                                                                  "<|padding|>"])
    tok.train_from_iterator(data.captions, trainer)
    tok.save(str(root / "tokenizer.json"))
    return root / "tokenizer.json"


def test_hf_tokenizer_json_gpt_neox_style(corpus, hf_json):
    _, data, _, _ = corpus
    tok = factory.load_text_tokenizer("auto", hf_json, vocab_size=320)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 0, 1, 320)
    for caption in data.captions[:5]:
        ids = tok.encode(caption)
        assert ids and max(ids) < 300 and 0 not in ids and tok.decode(ids) == caption
    same = HFTokenizer.load(hf_json.parent, vocab_size=320)  # a folder with tokenizer.json
    assert same.identity() == tok.identity()
    assert HFTokenizer.load(hf_json).identity() != tok.identity()  # another vocab size
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        HFTokenizer.load(hf_json, vocab_size=10)
    with pytest.raises(ValueError, match="bos token '<s>' is not in the vocabulary"):
        HFTokenizer.load(hf_json, bos_token="<s>")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        HFTokenizer.load(hf_json.parent / "nothing.json")


def test_preprocess_with_a_tokenizer_json(corpus, hf_json):
    root, data, _, vq = corpus
    summary = preprocess(_settings(root, ["pairs.jsonl"], "hf",
                                   text_tokenizer=("hf", str(hf_json)),
                                   text_tokenizer_options=(("vocab_size", 320),)))
    tok = HFTokenizer.load(hf_json, vocab_size=320)
    layout = VocabLayout.from_dict(summary.sidecar["layout"])
    assert (layout.text_size, layout.bos_id, layout.pad_id) == (320, 0, 1)
    assert summary.sidecar["text_tokenizer"]["kind"] == "hf"
    assert _docs(root / "hf") == _expected(tok, vq, layout, data.captions, data.images)


def test_factory_kinds():
    with pytest.raises(ValueError, match="unknown image tokenizer kind 'vqgan'"):
        factory.load_image_tokenizer("vqgan", "x")
    with pytest.raises(ValueError, match="unknown text tokenizer kind"):
        factory.load_text_tokenizer("bpe", "x")
    assert set(factory.IMAGE_KINDS) >= {"kmeans", "movqgan"}
    try:  # MoVQGAN is resolved lazily, by MoVQGAN.from_checkpoint
        from megatron_t2i.tokenizers.movqgan import MoVQGAN
    except ImportError:
        with pytest.raises(ImportError, match="movqgan"):
            factory.image_tokenizer_loader("movqgan")
    else:
        assert factory.image_tokenizer_loader("movqgan") == MoVQGAN.from_checkpoint


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_tools(corpus, tmp_path, capsys):
    root, data, _, _ = corpus
    inputs = [str(root / "pairs.jsonl")]
    assert _tool("train_text_tokenizer").main(
        ["--input", *inputs, "--vocab-size", "80", "--model-prefix", str(tmp_path / "sp")]) == 0
    sp = SentencePieceTokenizer.load(tmp_path / "sp.model")
    assert sp.vocab_size == 80 and sp.decode(sp.encode(data.captions[0])) == data.captions[0]
    assert _tool("fit_kmeans_vq").main(
        ["--input", *inputs, "--image-size", "32", "--patch-size", "8", "--codebook-size", "16",
         "--iters", "2", "--output", str(tmp_path / "vq.npz")]) == 0
    assert KMeansPatchVQ.load(tmp_path / "vq.npz").tokens_per_image == 16
    tool = _tool("preprocess_data")
    assert tool.main(["--input", *inputs, "--output-prefix", str(tmp_path / "out"),
                      "--text-tokenizer", str(tmp_path / "sp.model"), "--image-tokenizer",
                      f"kmeans:{tmp_path / 'vq.npz'}", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {N} documents" in out and "skipped 4 records" in out
    assert tool.main(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", "x",
                      "--text-tokenizer", str(tmp_path / "sp.model"), "--image-tokenizer",
                      f"kmeans:{tmp_path / 'vq.npz'}"]) == 1
    assert "none.jsonl not found" in capsys.readouterr().err
