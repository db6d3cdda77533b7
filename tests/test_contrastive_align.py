"""Contrastive alignment of image-code embeddings against a frozen text table (demo corpus)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, train_env
from safetensors.torch import load_file, save_file

from megatron_t2i.checkpoint.io import TensorSpec, write_checkpoint
from megatron_t2i.checkpoint.layout import write_latest
from megatron_t2i.config import load_config
from megatron_t2i.data.demo import prepare_demo_corpus
from megatron_t2i.experiments.alignment.contrastive import (
    METRICS_FILE,
    NEAREST_FILE,
    ROWS_FILE,
    ROWS_TENSOR,
    AlignConfig,
    AlignmentError,
    align,
    load_text_embeddings,
    read_pairs,
)
from megatron_t2i.model.keys import vocab_table_keys

HIDDEN = 32


@pytest.fixture(scope="module")
def demo(corpus_dir):
    """The tiny demo corpus (shared with the trainer tests) and its text tokenizer file."""
    cfg = load_config(REPO / "configs/demo.yaml", [*TINY, f"data.cache_dir={corpus_dir}"])
    prefix, layout, _, _ = prepare_demo_corpus(cfg.data, cfg.train.seed)
    return prefix, layout, Path(prefix).parent / "text.model"


@pytest.fixture(scope="module")
def table_file(tmp_path_factory, demo) -> Path:
    """A random stand-in for a pretrained LM's text table, one row per text id."""
    path = tmp_path_factory.mktemp("table") / "text_table.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"embed": torch.randn(demo[1].text_size, HIDDEN, generator=gen) * 0.02}, path)
    return path


def test_loss_falls_temperature_learns_and_outputs_written(tmp_path, demo, table_file):
    prefix, layout, _ = demo
    pairs = read_pairs(prefix)
    assert pairs.codes.shape[1] == 64 and int(pairs.codes.max()) < layout.image_size
    table = load_text_embeddings(table_file)
    cfg = AlignConfig(steps=40, batch_size=32, lr=1e-2, top_k=5, log_interval=20)
    result = align(table, pairs, cfg, out_dir=tmp_path)

    assert abs(result.losses[0] - math.log(32)) < 1.0  # starts near chance
    assert sum(result.losses[-5:]) / 5 < 0.5 * result.losses[0]
    assert abs(result.temperatures[-1] - 0.07) > 1e-3  # the temperature is learned
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert [r["loss"] for r in records] == pytest.approx(result.losses)
    assert [r["temperature"] for r in records] == pytest.approx(result.temperatures)

    rows = load_file(tmp_path / ROWS_FILE)
    assert list(rows) == [ROWS_TENSOR]
    assert rows[ROWS_TENSOR].shape == (layout.image_size, HIDDEN)
    assert rows[ROWS_TENSOR].dtype == torch.float32
    assert torch.equal(rows[ROWS_TENSOR], result.image_rows)

    report = json.loads((tmp_path / NEAREST_FILE).read_text())
    assert [c["code"] for c in report["codes"]] == list(range(layout.image_size))
    for entry in report["codes"]:
        cosines = [n["cosine"] for n in entry["nearest"]]
        assert len(cosines) == 5 and cosines == sorted(cosines, reverse=True)
        assert all(0 <= n["id"] < layout.text_size for n in entry["nearest"])
    assert report["summary"]["image_codes"] == layout.image_size
    assert 1 <= report["summary"]["distinct_top1_tokens"] <= layout.text_size


def test_rows_are_what_vocab_surgery_reads(tmp_path, demo, table_file):
    from megatron_t2i.checkpoint.surgery import load_init_file

    pairs = read_pairs(demo[0])
    align(load_text_embeddings(table_file), pairs, AlignConfig(steps=2, batch_size=8),
          out_dir=tmp_path)
    rows = load_init_file(tmp_path / ROWS_FILE, demo[1].image_size, HIDDEN, untied=True)
    assert rows["word_embeddings"].shape == (demo[1].image_size, HIDDEN)


def write_tiny_checkpoint(root: Path, layout, padded: int) -> torch.Tensor:
    """A trainer-format checkpoint holding just the word embeddings (rows past the text
    vocabulary are image codes and padding, which the alignment must not take as text)."""
    table = torch.randn(padded, HIDDEN, generator=torch.Generator().manual_seed(1))
    key = vocab_table_keys()[0]
    write_checkpoint(root / "iter_0000001", {key: TensorSpec((padded, HIDDEN), torch.float32)},
                     lambda k: table, common={},
                     meta={"vocab": layout.to_dict(), "padded_vocab_size": padded})
    write_latest(root, 1)
    return table


def test_cli_from_a_checkpoint_with_token_strings(tmp_path, demo):
    prefix, layout, text_model = demo
    table = write_tiny_checkpoint(tmp_path / "ckpt", layout, padded=512)
    assert torch.equal(load_text_embeddings(tmp_path / "ckpt"), table[:layout.text_size])
    out = tmp_path / "align"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/contrastive_align.py"), "--text-embeddings",
         str(tmp_path / "ckpt"), "--data", prefix, "--out", str(out), "--steps", "3",
         "--batch-size", "16", "--top-k", "3", "--text-tokenizer", str(text_model)],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "temperature" in proc.stdout and "final loss" in proc.stdout
    assert len((out / METRICS_FILE).read_text().splitlines()) == 3
    report = json.loads((out / NEAREST_FILE).read_text())
    tokens = [n["token"] for c in report["codes"] for n in c["nearest"]]
    assert all(isinstance(t, str) for t in tokens) and any(t.strip() for t in tokens)


def test_cli_reports_a_missing_file(tmp_path, demo):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/contrastive_align.py"), "--text-embeddings",
         str(tmp_path / "nope.safetensors"), "--data", demo[0], "--out", str(tmp_path / "o")],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"text embeddings {tmp_path / 'nope.safetensors'}: no such file" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bad_tables_refused(tmp_path, demo):
    pairs = read_pairs(demo[0])
    short = tmp_path / "short.safetensors"
    save_file({"embed": torch.zeros(100, HIDDEN)}, short)
    with pytest.raises(AlignmentError, match="has 100 rows but the token files' text "
                                             "vocabulary has 128 ids"):
        align(load_text_embeddings(short), pairs, AlignConfig(steps=1))
    flat = tmp_path / "flat.pt"
    torch.save(torch.zeros(128), flat)
    with pytest.raises(AlignmentError, match=r"expected a 2-D float table.*\(128,\)"):
        load_text_embeddings(flat)
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(128, HIDDEN), "b": torch.zeros(128, HIDDEN)}, two)
    with pytest.raises(AlignmentError, match=r"holds \['a', 'b'\]; name the table"):
        load_text_embeddings(two)
    assert load_text_embeddings(two, "b").shape == (128, HIDDEN)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(AlignmentError, match="not a safetensors or torch tensor file"):
        load_text_embeddings(junk)
    with pytest.raises(AlignmentError, match="batch_size must be at least 2"):
        align(torch.zeros(128, HIDDEN), pairs, AlignConfig(steps=1, batch_size=1))
