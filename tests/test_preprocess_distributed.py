"""Distributed, resumable preprocessing: the shard set does not depend on the number of
encoder processes (gloo, started as torchrun does) or decode workers; a run killed part-way and rerun gives
the bytes of an uninterrupted run; a rerun with other settings is refused."""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, train_env
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_t2i.data import synthetic
from megatron_t2i.data.indexed import read_sidecar
from megatron_t2i.data.preprocess import Settings, load_tokenizers
from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
from megatron_t2i.tokenizers.text import SentencePieceTokenizer

N = 12  # records per input file
TASKS = 6  # jsonl cut in 2 (task-bytes), 1 tar, 3 parquet row groups


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("dist_corpus"))


def make_corpus(root: Path) -> Path:
    """N image-caption pairs as jsonl (one missing image more), tar and parquet; the
    sentencepiece and k-means tokenizers fitted on them."""
    root.mkdir(parents=True, exist_ok=True)
    data = synthetic.generate(N, 32, seed=1)
    pngs = [_png(im) for im in data.images]
    (root / "img").mkdir()
    for i, png in enumerate(pngs):
        (root / "img" / f"{i}.png").write_bytes(png)
    lines = [json.dumps({"image": f"img/{i}.png", "caption": c})
             for i, c in enumerate(data.captions)]
    lines.insert(5, json.dumps({"image": "img/gone.png", "caption": "a red circle"}))  # skipped
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    with tarfile.open(root / "pairs.tar", "w") as tar:
        for i, (png, cap) in enumerate(zip(pngs, data.captions)):
            for name, blob in ((f"{i:04d}.png", png), (f"{i:04d}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    pq.write_table(pa.table({"image": pngs, "caption": data.captions}), root / "pairs.parquet",
                   row_group_size=4)
    SentencePieceTokenizer.train(data.captions, 64, root / "sp")
    KMeansPatchVQ.fit(data.images, codebook_size=16, patch_size=8, seed=0, iters=2).save(
        root / "vq.npz")
    return root


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    jsonl = root / "pairs.jsonl"
    return ["--input", str(jsonl), str(root / "pairs.tar"), str(root / "pairs.parquet"),
            "--output-prefix", str(out), "--text-tokenizer", str(root / "sp.model"),
            "--image-tokenizer", f"kmeans:{root / 'vq.npz'}", "--batch-size", "3",
            "--task-bytes", str(jsonl.stat().st_size // 2 + 1), "--no-progress", *extra]


def _tool():
    spec = importlib.util.spec_from_file_location("tool", REPO / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=train_env(PYTHONPATH=str(REPO), **env),
                          capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _files(out: Path) -> dict[str, bytes]:
    """Every file of a shard set (shards, done files, fingerprint, manifest, sidecar)."""
    found = [*Path(f"{out}.shards").iterdir(), Path(f"{out}.shards.json"),
             Path(f"{out}.vocab.json"), Path(f"{out}.skipped.jsonl")]
    return {p.name: p.read_bytes() for p in found}


def _docs(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def reference(corpus) -> Path:
    """One encoder process, decoding in it: the uninterrupted run the others must equal."""
    out = corpus / "ref" / "t2i"
    assert _tool().main(_args(corpus, out)) == 0
    return out


def test_shard_set_manifest_and_sidecar(corpus, reference):
    manifest = json.loads(Path(f"{reference}.shards.json").read_text())
    assert manifest["format"] == "megatron_t2i.token_shards" and manifest["version"] == 1
    shards = manifest["shards"]
    assert [s["prefix"] for s in shards] == [f"t2i.shards/{i:06d}" for i in range(TASKS)]
    docs = [d for s in shards for d in _docs(reference.parent / s["prefix"])]
    assert [s["documents"] for s in shards] == [len(_docs(reference.parent / s["prefix"]))
                                                for s in shards]
    side = read_sidecar(reference)
    assert side["num_documents"] == len(docs) == 3 * N
    assert side["num_tokens"] == sum(s["tokens"] for s in shards) == sum(map(len, docs))
    assert side["skipped"] == {"missing image": 1}
    assert not Path(f"{reference}.bin").exists()
    # --merge: the same documents in one .bin/.idx, and no shards left behind
    merged = corpus / "merged" / "t2i"
    assert _tool().main(_args(corpus, merged, "--merge")) == 0
    assert _docs(merged) == docs
    assert not Path(f"{merged}.shards").exists() and not Path(f"{merged}.shards.json").exists()


def test_decode_workers_and_encoder_processes_do_not_change_a_byte(corpus, reference):
    workers = corpus / "w2" / "t2i"
    assert _tool().main(_args(corpus, workers, "--workers", "2")) == 0
    assert _files(workers) == _files(reference)
    # two encoder processes (gloo) as torchrun starts them, two decode workers each
    ranks = corpus / "r2" / "t2i"
    cmd = [sys.executable, "tools/preprocess_data.py", *_args(corpus, ranks, "--workers", "2")]
    env = dict(train_env(PYTHONPATH=str(REPO)), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    assert ["wrote 36 documents" in out for out, _ in outs] == [True, False]  # rank 0 reports
    assert _files(ranks) == _files(reference)


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_run(corpus, reference):
    out = corpus / "killed" / "t2i"
    proc = _run([sys.executable, "tests/scripts/preprocess_killed.py", *_args(corpus, out)],
                T2I_KILL_AFTER_SHARDS="2")
    assert proc.returncode == -9, proc.stderr[-3000:]
    shard_dir = Path(f"{out}.shards")
    done = sorted(p.name for p in shard_dir.glob("*.done.json"))
    assert done == ["000000.done.json", "000001.done.json"]
    assert (shard_dir / "000002.tmp.bin").stat().st_size > 0  # the partial shard
    assert not Path(f"{out}.shards.json").exists() and not Path(f"{out}.vocab.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("00000[01].*")}
    assert _tool().main(_args(corpus, out, "--workers", "2")) == 0  # other workers: allowed
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("00000[01].*")} == kept
    assert not list(shard_dir.glob("*.tmp.*"))
    assert _files(out) == _files(reference)


def test_a_rerun_with_other_settings_is_refused(corpus, reference, capsys):
    before = _files(reference)
    assert _tool().main(_args(corpus, reference, "--batch-size", "5")) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fingerprint.json" in err and "differs in: batch_size" in err
    assert _files(reference) == before  # nothing deleted or rewritten


def test_batch_size_reaches_movqgan(corpus, tmp_path):
    """--batch-size is MoVQGAN's forward batch (no fixed 16)."""
    pytest.importorskip("diffusers")
    from megatron_t2i.tokenizers.movqgan import MoVQConfig, MoVQGAN

    small = MoVQConfig(ch=32, num_res_blocks=1, resolution=32, n_embed=64)
    MoVQGAN.from_config(small, device="cpu").save(tmp_path / "movq.safetensors")
    settings = Settings((str(corpus / "pairs.jsonl"),), str(tmp_path / "t2i"),
                        text_tokenizer=("auto", str(corpus / "sp.model")),
                        image_tokenizer=("movqgan", str(tmp_path / "movq.safetensors")),
                        batch_size=5)
    assert load_tokenizers(settings)[1].batch_size == 5
    args = _args(corpus, tmp_path / "t2i", "--batch-size", "5")
    args[args.index("--image-tokenizer") + 1] = f"movqgan:{tmp_path / 'movq.safetensors'}"
    assert _tool().main(args) == 0
    side = read_sidecar(tmp_path / "t2i")
    assert side["num_documents"] == 3 * N and side["image_tokenizer"]["tokens_per_image"] == 16
