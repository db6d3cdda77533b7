"""Foreign token files adopted safely: tools/import_token_files.py on a Megatron-LM-layout
uint16 text file, sidecar mode and id-range checks on opening, and per-sample modality range
checks at training that name the prefix and the document."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_t2i.config import load_config
from megatron_t2i.data import synthetic
from megatron_t2i.data.dataset import PackedTextDataset, T2IDataset
from megatron_t2i.data.demo import prepare_demo_corpus
from megatron_t2i.data.documents import make_document
from megatron_t2i.data.indexed import DataFileError, open_indexed, paths, write_indexed
from megatron_t2i.vocab import VocabLayout

REPO = Path(__file__).resolve().parents[1]
LAYOUT = VocabLayout(text_size=50, image_size=16, bos_id=1, eod_id=2, text_pad_id=3)


def _tool():
    spec = importlib.util.spec_from_file_location("imp", REPO / "tools/import_token_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _megatron_lm_text(prefix: Path, docs: list[list[int]]) -> None:
    """What Megatron-LM's preprocessing writes for a < 65,500-id tokenizer: uint16 tokens
    through megatron-core's own builder, and no sidecar."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def _patch_token(prefix: Path, document: int, offset: int, value: int) -> None:
    """Overwrite one token of a document in the .bin (the sidecar is left as it was)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    pointer = int(ds.index.sequence_pointers[document])
    with open(f"{prefix}.bin", "r+b") as f:
        f.seek(pointer + offset * ds.index.dtype().itemsize)
        f.write(np.asarray([value], dtype=ds.index.dtype).tobytes())


@pytest.fixture(scope="module")
def demo(tmp_path_factory, corpus_dir):
    """The tiny demo corpus of the trainer tests (shared cache) and a Megatron-LM text file
    written with its sentencepiece model."""
    from conftest import TINY

    cache = corpus_dir
    cfg = load_config(REPO / "configs/demo.yaml", [*TINY, f"data.cache_dir={cache}"])
    prefix, layout, text, _ = prepare_demo_corpus(cfg.data, cfg.train.seed)
    captions = synthetic.generate(240, 32, seed=7).captions
    docs = [[t for c in captions[i:i + 4] for t in text.encode(c)] + [text.eos_id]
            for i in range(0, len(captions), 4)]
    root = tmp_path_factory.mktemp("import")
    _megatron_lm_text(root / "lm_text", docs)
    return cache, prefix, layout, root, docs


# ---- the import tool ------------------------------------------------------------------------

def test_import_writes_a_text_sidecar_with_the_id_range(demo, capsys):
    _, prefix, layout, root, docs = demo
    model = Path(prefix).parent / "text.model"
    assert not paths(root / "lm_text")["vocab.json"].exists()
    assert _tool().main([str(root / "lm_text"), "--text-tokenizer", str(model),
                         "--image-vocab-size", str(layout.image_size)]) == 0
    assert "ids" in capsys.readouterr().out
    side = json.loads(paths(root / "lm_text")["vocab.json"].read_text())
    flat = [t for d in docs for t in d]
    assert side["mode"] == "text" and side["id_range"] == [min(flat), max(flat)]
    assert side["imported"]["dtype"] == "uint16" and side["num_documents"] == len(docs)
    assert VocabLayout.from_dict(side["layout"]) == layout
    indexed = open_indexed(root / "lm_text", layout)  # kept: its items view its memory map
    assert indexed[3].tolist() == docs[3]


def test_import_refuses_an_out_of_range_id_naming_the_document(demo, tmp_path, capsys):
    _, prefix, layout, _, docs = demo
    bad = [list(d) for d in docs]
    bad[7][2] = layout.text_size  # the first image code's id
    _megatron_lm_text(tmp_path / "bad", bad)
    code = _tool().main([str(tmp_path / "bad"), "--text-tokenizer",
                         str(Path(prefix).parent / "text.model"), "--image-vocab-size", "256"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'bad'}.bin: document 7 holds id {layout.text_size}" in err
    assert not paths(tmp_path / "bad")["vocab.json"].exists()


# ---- sidecar checks when opening ------------------------------------------------------------

def test_sidecar_without_mode_or_with_ids_outside_the_layout_is_refused(tmp_path):
    write_indexed(tmp_path / "t", [[1, 5, 6, 2]] * 3, LAYOUT, meta={"mode": "text"})
    side_path = paths(tmp_path / "t")["vocab.json"]
    side = json.loads(side_path.read_text())
    assert side["id_range"] == [1, 6] and open_indexed(tmp_path / "t", LAYOUT)
    for edit, message in (({"mode": None}, "'mode' is None"),
                          ({"id_range": [1, 55]}, r"token ids 1..55 do not fit text files"),
                          ({"mode": "conditional", "id_range": [0, 70]}, r"\[0, 68\)")):
        side_path.write_text(json.dumps({**side, **edit}))
        with pytest.raises(DataFileError, match=message):
            open_indexed(tmp_path / "t", LAYOUT)
    side.pop("id_range")
    side_path.write_text(json.dumps(side))
    with pytest.raises(DataFileError, match="no 'id_range'"):
        open_indexed(tmp_path / "t", LAYOUT)


# ---- per-sample checks at training ----------------------------------------------------------

@pytest.mark.parametrize("where, value, message", [
    (4, 7, r"holds id 7 in its image part, outside the image range \[50, 66\)"),  # text in image
    (1, 55, r"holds id 55 in its text part, outside the text range \[0, 50\)"),  # code in text
    (2, 68, r"holds id 68 in its text part"),  # a padding row (the layout has 69 ids)
])
def test_image_document_with_ids_of_another_modality_fails_naming_it(tmp_path, where, value,
                                                                     message):
    rng = np.random.default_rng(0)
    docs = [make_document([9, 10], rng.integers(0, 16, 4), LAYOUT) for _ in range(6)]
    write_indexed(tmp_path / "img", docs, LAYOUT, meta={"mode": "conditional"})
    _patch_token(tmp_path / "img", 4, where, value)
    ds = T2IDataset(open_indexed(tmp_path / "img", LAYOUT), LAYOUT, 12, range(6))
    assert ds[3]["tokens"].tolist()[:3] == [1, 9, 10]
    with pytest.raises(DataFileError, match=f"{tmp_path / 'img'}: document 4 {message}"):
        ds[4]


def test_packed_text_with_an_image_code_fails_naming_the_document(tmp_path):
    write_indexed(tmp_path / "txt", [[1, *range(5, 15), 2]] * 8, LAYOUT, meta={"mode": "text"})
    _patch_token(tmp_path / "txt", 5, 4, LAYOUT.image_start)
    ds = PackedTextDataset(open_indexed(tmp_path / "txt", LAYOUT), LAYOUT, 8, range(8), seed=0)
    failures = []
    for i in range(len(ds)):
        try:
            ds[i]
        except DataFileError as e:
            failures.append(str(e))
    assert failures and all(f.startswith(f"{tmp_path / 'txt'}: document 5 holds id 50")
                            for f in failures)


# ---- a Megatron-LM text file blended into a demo run ----------------------------------------

def test_imported_text_trains_in_a_blend_and_an_edited_file_fails_naming_it(demo, tmp_path):
    from conftest import read_metrics, run_train

    cache, prefix, layout, root, _ = demo
    if not paths(root / "lm_text")["vocab.json"].exists():  # this test run alone
        assert _tool().main([str(root / "lm_text"), "--text-tokenizer",
                             str(Path(prefix).parent / "text.model"),
                             "--image-vocab-size", str(layout.image_size)]) == 0
    run = run_train(tmp_path / "run", cache, overrides=[
        f"data.data_paths=[{prefix},{root / 'lm_text'}]", "data.data_weights=[3,1]",
        "train.train_iters=2"])
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "captions" in run.stdout and "caption budget" in run.stdout

    edited = tmp_path / "edited"
    for ext, path in paths(root / "lm_text").items():
        shutil.copy(path, f"{edited}.{ext}")
    for doc in range(60):  # an image code in every document: the first sample hits one
        _patch_token(edited, doc, 1, layout.image_start + 5)
    failed = run_train(tmp_path / "run2", cache, check=False, overrides=[
        f"data.data_paths=[{prefix},{edited}]", "data.data_weights=[1,1]",
        "train.train_iters=2"])
    assert failed.returncode != 0
    assert f"{edited}: document " in failed.stderr
    assert f"outside the text range [0, {layout.text_size})" in failed.stderr


def test_long_captions_are_counted_against_the_budget_at_training_start():
    from megatron_t2i.data.loader import Source, long_captions_line

    cfg = load_config(None, ["model.seq_length=20", "data.image_tokens_per_sample=8"])
    sources = [Source("a", None, {"caption_token_counts": {"5": 10, "10": 3, "12": 1}}),
               Source("b", None, {"caption_token_counts": {"11": 2}}),
               Source("t", None, {"mode": "text"})]
    line = long_captions_line(cfg, sources)  # budget 20 - 8 - 2 = 10 tokens
    assert line.startswith("data: 3 of 16 captions (18.8%) are longer than the 10-token")
    assert line.endswith("the longest has 12 tokens (a)")
    assert "all 16 captions fit" in long_captions_line(
        load_config(None, ["model.seq_length=22", "data.image_tokens_per_sample=8"]), sources)


def test_add_id_range_to_an_older_sidecar(tmp_path, capsys):
    rng = np.random.default_rng(1)
    docs = [make_document([9, 10], rng.integers(0, 16, 4), LAYOUT) for _ in range(4)]
    write_indexed(tmp_path / "old", docs, LAYOUT, meta={"mode": "conditional"})
    side_path = paths(tmp_path / "old")["vocab.json"]
    side = json.loads(side_path.read_text())
    recorded = side.pop("id_range")
    side_path.write_text(json.dumps(side))  # as written before sidecars had a range
    with pytest.raises(DataFileError, match="no 'id_range'"):
        open_indexed(tmp_path / "old", LAYOUT)
    assert _tool().main([str(tmp_path / "old"), "--add-id-range"]) == 0
    assert json.loads(side_path.read_text())["id_range"] == recorded
    assert len(open_indexed(tmp_path / "old", LAYOUT)) == 4

    _patch_token(tmp_path / "old", 2, 5, LAYOUT.size + 3)  # a padding row: refused
    assert _tool().main([str(tmp_path / "old"), "--add-id-range"]) == 1
    assert "document 2 holds id 71, outside the conditional files' range [0, 68)" in \
        capsys.readouterr().err
