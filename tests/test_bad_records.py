"""Bad records are never fatal: damaged tars, unusual image modes, binary parquet captions;
each skipped record is counted with its reason and named in `<prefix>.skipped.jsonl`."""

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
from PIL import Image

from megatron_t2i.data import synthetic
from megatron_t2i.data.indexed import read_sidecar
from megatron_t2i.data.preprocess import BACKGROUND, Settings, load_image, preprocess, to_rgb
from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
from megatron_t2i.tokenizers.text import SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[1]
N = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    data = synthetic.generate(N, 32, seed=1)
    SentencePieceTokenizer.train(data.captions * 4, 80, root / "sp")
    KMeansPatchVQ.fit(data.images, codebook_size=16, patch_size=8, seed=0, iters=2) \
        .save(root / "vq.npz")
    pngs = [_png(im) for im in data.images]
    _write_tar(root / "good.tar", pngs, data.captions)
    return root, data, pngs


def _png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path: Path, pngs: list[bytes], captions: list[str]) -> list[int]:
    """webdataset pairs; returns the byte offset where each record's image starts."""
    starts = []
    with tarfile.open(path, "w") as tar:
        for i, (png, cap) in enumerate(zip(pngs, captions)):
            starts.append(tar.offset)
            for name, blob in ((f"{i:04d}.png", png), (f"{i:04d}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return starts


def _settings(root: Path, inputs: list[Path], out: str, **kw) -> Settings:
    return Settings(tuple(map(str, inputs)), str(root / out), text_tokenizer=(
        "auto", str(root / "sp.model")), image_tokenizer=("kmeans", str(root / "vq.npz")),
        progress=False, **kw)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skips(prefix: Path) -> list[dict]:
    return [json.loads(x) for x in Path(f"{prefix}.skipped.jsonl").read_text().splitlines()]


# ---- damaged tars ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def damaged(corpus):
    """A tar cut inside record 5's image, and one whose record 3 header is overwritten."""
    root, data, pngs = corpus
    starts = _write_tar(root / "cut.tar", pngs, data.captions)
    blob = (root / "cut.tar").read_bytes()
    (root / "cut.tar").write_bytes(blob[:starts[5] + 700])
    starts = _write_tar(root / "corrupt.tar", pngs, data.captions)
    blob = bytearray((root / "corrupt.tar").read_bytes())
    blob[starts[3]:starts[3] + 512] = b"\x7f" * 512
    (root / "corrupt.tar").write_bytes(bytes(blob))
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_damaged_tars_keep_the_records_before_the_damage(corpus, damaged, capsys, workers):
    root = damaged
    prefix = root / f"tars{workers}"
    code = _tool("preprocess_data").main([
        "--input", str(root / "good.tar"), str(root / "cut.tar"), str(root / "corrupt.tar"),
        "--output-prefix", str(prefix), "--text-tokenizer", str(root / "sp.model"),
        "--image-tokenizer", f"kmeans:{root / 'vq.npz'}", "--workers", str(workers),
        "--no-progress"])
    assert code == 0
    side = read_sidecar(prefix)
    # all of good.tar; cut.tar up to its record 5 (read when the data ended); corrupt.tar
    # up to its record 2 (read when the broken header came)
    assert side["num_documents"] == N + 5 + 2
    assert side["skipped"] == {"damaged tar": 2}
    skips = _skips(prefix)
    assert [(Path(s["source"]).name, s["reason"]) for s in skips] == \
        [("cut.tar", "damaged tar"), ("corrupt.tar", "damaged tar")]
    assert "from record '0005' on" in skips[0]["detail"] and "'0002'" in skips[1]["detail"]
    assert "cut.tar" in capsys.readouterr().out


def test_tokenizer_fitting_tools_survive_a_damaged_tar(corpus, damaged, tmp_path, capsys):
    root = damaged
    assert _tool("train_text_tokenizer").main(
        ["--input", str(root / "cut.tar"), str(root / "good.tar"), "--vocab-size", "60",
         "--model-prefix", str(tmp_path / "sp")]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 records: 1 damaged tar" in err and "cut.tar" in err
    assert _tool("fit_kmeans_vq").main(
        ["--input", str(root / "corrupt.tar"), "--image-size", "32", "--patch-size", "8",
         "--codebook-size", "2", "--iters", "1", "--output", str(tmp_path / "vq.npz")]) == 0
    err = capsys.readouterr().err
    assert "damaged tar" in err and "corrupt.tar" in err
    assert KMeansPatchVQ.load(tmp_path / "vq.npz").codebook_size == 2


# ---- image modes ----------------------------------------------------------------------------

def _ramp() -> np.ndarray:
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64x64, 0..252


def test_16_bit_grayscale_is_scaled_not_white():
    ramp = _ramp()
    im16 = Image.open(io.BytesIO(_png(ramp.astype(np.uint16) * 257)))
    assert im16.mode.startswith("I")
    got = load_image(_png(ramp.astype(np.uint16) * 257), 64)
    assert np.array_equal(got, np.stack([ramp] * 3, axis=-1))


def test_alpha_is_composited_on_the_stated_background():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere; opaque left half, transparent right, half-alpha row
    rgba[:, :16, 3] = 255
    rgba[0, :, 3] = 128
    got = load_image(_png(rgba), 32).astype(int)
    assert tuple(got[5, 5]) == (200, 0, 0) and tuple(got[5, 20]) == BACKGROUND
    assert abs(got[0, 20, 1] - 127) <= 1  # half of white's green over black's

    la = Image.fromarray(np.stack([np.full((32, 32), 10, np.uint8), rgba[..., 3]], -1), "LA")
    got = load_image(_png(la), 32)
    assert tuple(got[5, 5]) == (10, 10, 10) and tuple(got[5, 20]) == BACKGROUND


def test_palette_with_a_transparent_index_and_cmyk():
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)  # index 0 transparent
    got = load_image(buf.getvalue(), 16)
    assert tuple(got[0, 0]) == BACKGROUND and tuple(got[0, 12]) == (0, 0, 255)

    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    got = load_image(buf.getvalue(), 16).astype(int)
    assert got[..., 0].max() < 20 and got[..., 1:].min() > 235
    assert to_rgb(Image.new("RGB", (2, 2), (1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)


# ---- parquet --------------------------------------------------------------------------------

def test_binary_caption_column_and_skip_labels_for_any_worker_count(corpus):
    root, data, pngs = corpus
    rows = 50
    captions = [data.captions[i % N].encode() for i in range(rows)]
    captions[40] = b"\xff\xfe not utf-8"
    table = pa.table({"image": [pngs[i % N] for i in range(rows)],
                      "caption": pa.array(captions, type=pa.binary())})
    pq.write_table(table, root / "bin.parquet", row_group_size=10)
    strings = table.set_column(1, "caption", pa.array([c.decode("utf-8", "replace")
                                                       for c in captions]))
    pq.write_table(strings.filter(pa.array([i != 40 for i in range(rows)])),
                   root / "str.parquet", row_group_size=10)
    for workers in (1, 2):
        summary = preprocess(_settings(root, [root / "bin.parquet"], f"bin{workers}",
                                       workers=workers))
        assert summary.skipped == {"caption not UTF-8": 1}
        assert [s["source"] for s in _skips(root / f"bin{workers}")] == \
            [f"{root / 'bin.parquet'}:row 40 (group 4 row 0)"]
    preprocess(_settings(root, [root / "str.parquet"], "str"))
    assert (root / "bin1.bin").read_bytes() == (root / "str.bin").read_bytes()


def test_caption_lengths_are_counted_in_the_sidecar(corpus):
    root, data, _ = corpus
    preprocess(_settings(root, [root / "good.tar"], "lengths"))
    side = read_sidecar(root / "lengths")
    text = SentencePieceTokenizer.load(root / "sp.model")
    lengths = [len(text.encode(c)) for c in data.captions]
    counts = {int(k): v for k, v in side["caption_token_counts"].items()}
    assert counts == {n: lengths.count(n) for n in set(lengths)}
    assert side["max_caption_tokens"] == max(lengths)
