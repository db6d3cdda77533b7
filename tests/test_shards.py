"""A shard set (`PREFIX.shards.json` + one megatron-core indexed file per task) read directly
by training: the same samples as the merged file, the same checks, and refusals naming the
file for missing, truncated or miscounted shards."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_t2i.config import config_from_dict
from megatron_t2i.data.dataset import PackedTextDataset, T2IDataset
from megatron_t2i.data.documents import make_document
from megatron_t2i.data.indexed import (
    DataFileError,
    manifest_path,
    merge_indexed,
    open_indexed,
    paths,
    write_indexed,
    write_sidecar,
)
from megatron_t2i.data.loader import build_datasets, resolve_sources
from megatron_t2i.data.shards import ShardedIndexed, write_manifest
from megatron_t2i.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=50, image_size=16, bos_id=1, eod_id=2, text_pad_id=3)
CODES = 4
META = {"mode": "conditional", "text_tokenizer": {"identity": "sp"},
        "image_tokenizer": {"identity": "vq", "tokens_per_image": CODES}}


def _image_docs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_document(rng.integers(10, 50, rng.integers(1, 9)), rng.integers(0, 16, CODES),
                          LAYOUT) for _ in range(n)]


def write_shard_set(prefix: Path, shards: list[list[np.ndarray]], meta: dict = META) -> list[Path]:
    """Exactly what preprocessing leaves without --merge: one IndexedDatasetBuilder file per
    task under PREFIX.shards/, then the manifest, then the sidecar."""
    folder = Path(f"{prefix}.shards")
    folder.mkdir(parents=True)
    shard_prefixes = []
    for task, docs in enumerate(shards):
        shard = folder / f"{task:06d}"
        builder = IndexedDatasetBuilder(str(paths(shard)["bin"]), dtype=np.int32)
        for doc in docs:
            builder.add_document(np.asarray(doc, dtype=np.int32), [len(doc)])
        builder.finalize(str(paths(shard)["idx"]))
        shard_prefixes.append(shard)
    write_manifest(prefix, shard_prefixes)
    flat = np.concatenate([d for docs in shards for d in docs])
    write_sidecar(prefix, LAYOUT, meta, sum(map(len, shards)), flat.size,
                  (int(flat.min()), int(flat.max())))
    return shard_prefixes


@pytest.fixture
def shard_set(tmp_path) -> tuple[Path, list[Path]]:
    """Four shards of uneven sizes, one of them empty (a task whose records were all bad)."""
    sizes = [7, 0, 12, 5]
    prefix = tmp_path / "set"
    return prefix, write_shard_set(prefix, [_image_docs(n, seed) for seed, n in enumerate(sizes)])


def test_manifest_is_the_agreed_format(shard_set):
    prefix, _ = shard_set
    manifest = json.loads(manifest_path(prefix).read_text())
    assert manifest["format"] == "megatron_t2i.token_shards" and manifest["version"] == 1
    assert [s["prefix"] for s in manifest["shards"]] == [f"set.shards/{t:06d}" for t in range(4)]
    assert [s["documents"] for s in manifest["shards"]] == [7, 0, 12, 5]


def test_shard_set_gives_the_samples_of_the_merged_file(shard_set, tmp_path):
    prefix, shards = shard_set
    merge_indexed(tmp_path / "merged", shards, LAYOUT, META, id_range=(0, LAYOUT.size - 1))
    sharded, merged = open_indexed(prefix, LAYOUT), open_indexed(tmp_path / "merged", LAYOUT)
    assert isinstance(sharded, ShardedIndexed) and len(sharded) == len(merged) == 24
    np.testing.assert_array_equal(sharded.sequence_lengths, merged.sequence_lengths)
    a = T2IDataset(sharded, LAYOUT, 16, range(24), caption_dropout=0.3, seed=2)
    b = T2IDataset(merged, LAYOUT, 16, range(24), caption_dropout=0.3, seed=2)
    for i in range(48):  # two epochs: caption dropout differs per epoch
        for key in a[i]:
            np.testing.assert_array_equal(a[i][key], b[i][key])
    for i, offset, length in ((6, 2, 3), (7, 0, None), (23, 5, 4)):  # across shard edges
        np.testing.assert_array_equal(sharded.get(i, offset, length), merged.get(i, offset, length))


def test_packed_text_over_shards_equals_merged(tmp_path):
    rng = np.random.default_rng(3)
    docs = [[[LAYOUT.bos_id, *rng.integers(10, 50, rng.integers(2, 20)), LAYOUT.eod_id]
             for _ in range(n)] for n in (9, 4, 11)]
    meta = {"mode": "text", "text_tokenizer": {"identity": "sp"}, "image_tokenizer": None}
    shards = write_shard_set(tmp_path / "txt", docs, meta)
    merge_indexed(tmp_path / "m", shards, LAYOUT, meta, id_range=(1, 49))
    a = PackedTextDataset(open_indexed(tmp_path / "txt", LAYOUT), LAYOUT, 8, range(24), seed=1)
    b = PackedTextDataset(open_indexed(tmp_path / "m", LAYOUT), LAYOUT, 8, range(24), seed=1)
    assert len(a) == len(b) > 10
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])


def test_training_data_path_may_name_a_shard_set_in_a_blend(shard_set, tmp_path):
    prefix, _ = shard_set
    write_indexed(tmp_path / "single", _image_docs(10, seed=9), LAYOUT, META)
    cfg = config_from_dict({
        "model": {"seq_length": 16},
        "data": {"text_vocab_size": 50, "image_vocab_size": 16, "image_tokens_per_sample": CODES,
                 "split": "80,20,0", "data_paths": [str(prefix), str(tmp_path / "single")],
                 "data_weights": [0.5, 0.5]},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "seed": 5}})
    sources, layout = resolve_sources(cfg)
    train, valid = build_datasets(cfg, sources, layout)
    assert isinstance(train.datasets[0].indexed, ShardedIndexed)
    assert {int(train.source_of(i)) for i in range(len(train))} == {0, 1}
    assert all(train[i]["tokens"].shape == (16,) for i in range(len(train)))


def _truncate_bin(prefix, shards):
    bin_ = paths(shards[2])["bin"]
    bin_.write_bytes(bin_.read_bytes()[:-8])
    return bin_.name


def _remove_shard(prefix, shards):
    paths(shards[3])["bin"].unlink()
    return "000003.bin not found"


def _miscount(prefix, shards):
    manifest = json.loads(manifest_path(prefix).read_text())
    manifest["shards"][0]["documents"] = 8
    manifest_path(prefix).write_text(json.dumps(manifest))
    return "000000.idx: holds 7 documents"


def _escape(prefix, shards):
    manifest = json.loads(manifest_path(prefix).read_text())
    manifest["shards"][0]["prefix"] = "../elsewhere/000000"
    manifest_path(prefix).write_text(json.dumps(manifest))
    return "shards[0].prefix"


def _bad_format(prefix, shards):
    manifest_path(prefix).write_text(json.dumps({"format": "other", "shards": []}))
    return "set.shards.json: 'format'"


def _sidecar_totals(prefix, shards):
    side = json.loads(paths(prefix)["vocab.json"].read_text())
    side["num_documents"] = 25
    paths(prefix)["vocab.json"].write_text(json.dumps(side))
    return "num_documents is 25 but the shards"


def _both_kinds(prefix, shards):
    paths(prefix)["bin"].write_bytes(b"")
    return "remove the stale one"


@pytest.mark.parametrize("damage", [_truncate_bin, _remove_shard, _miscount, _escape,
                                    _bad_format, _sidecar_totals, _both_kinds])
def test_damaged_shard_sets_are_refused_naming_the_file(shard_set, damage):
    prefix, shards = shard_set
    expected = damage(prefix, shards)
    with pytest.raises((DataFileError, FileNotFoundError)) as e:
        open_indexed(prefix, LAYOUT)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_out_of_range_id_in_a_shard_names_the_set_and_document(shard_set):
    prefix, shards = shard_set
    bin_ = paths(shards[2])["bin"]  # documents 7.. of the set
    tokens = np.fromfile(bin_, dtype=np.int32)
    tokens[1] = LAYOUT.image_start + 1  # an image code inside document 7's caption
    tokens.tofile(bin_)
    dataset = T2IDataset(open_indexed(prefix, LAYOUT), LAYOUT, 16, range(24))
    dataset[6]
    with pytest.raises(DataFileError, match=rf"{prefix}: document 7 holds id"):
        dataset[7]


def test_many_shards_raise_the_open_file_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard open-file limit {hard} is too low for this test")
    write_shard_set(tmp_path / "many", [_image_docs(1, seed) for seed in range(150)])
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # 150 shards need ~700
    try:
        indexed = open_indexed(tmp_path / "many", LAYOUT)
        assert len(indexed) == 150 and indexed[149].size
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 150 * 3
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_preprocessing_output_is_read_as_its_merged_file(tmp_path):
    """What tools/preprocess_data.py leaves (without and with --merge) opens through the
    training loader's checks and gives the same samples."""
    import importlib.util

    from conftest import REPO
    from test_preprocess_distributed import make_corpus  # the corpus preprocessing is tested on

    from megatron_t2i.data.indexed import read_sidecar

    root = make_corpus(tmp_path / "corpus")
    spec = importlib.util.spec_from_file_location("tool", REPO / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--input", str(root / "pairs.jsonl"), str(root / "pairs.tar"),
            "--text-tokenizer", str(root / "sp.model"), "--image-tokenizer",
            f"kmeans:{root / 'vq.npz'}", "--batch-size", "3", "--no-progress"]
    assert tool.main([*args, "--output-prefix", str(tmp_path / "set")]) == 0
    assert tool.main([*args, "--output-prefix", str(tmp_path / "one"), "--merge"]) == 0
    layout = VocabLayout.from_dict(read_sidecar(tmp_path / "set")["layout"])
    sharded, merged = open_indexed(tmp_path / "set", layout), open_indexed(tmp_path / "one", layout)
    assert isinstance(sharded, ShardedIndexed) and len(sharded.shards) == 2
    assert len(sharded) == len(merged) > 20
    a, b = (T2IDataset(x, layout, 40, range(len(merged))) for x in (sharded, merged))
    for i in range(len(merged)):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
