"""Data-path figures: preprocessing rates and loader rates (prints numbers; not a test).

    python tools/bench_data.py                          # synthetic corpus, all CPU workers
    python tools/bench_data.py --images 4000 --workers 1 2
    python tools/bench_data.py --movqgan movqgan_270M.ckpt   # + MoVQGAN images/s on a GPU

Preprocessing: captions/s (text mode: tokenize + write) and images/s (conditional mode:
decode, resize, centre-crop, k-means VQ, write), with one worker and with several.
Loader: samples/s and tokens/s of our dataset (shuffled by the data-parallel sampler) side by
side with megatron-core's GPTDataset over the same files, single process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def build_corpus(root: Path, n: int, side: int) -> None:
    """n synthetic pictures as JPEGs (side px; the tokenizer takes 32 px) in a parquet file,
    a sentencepiece model on the captions and a 256-code k-means VQ."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from megatron_t2i.data import synthetic
    from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
    from megatron_t2i.tokenizers.text import SentencePieceTokenizer

    corpus = synthetic.generate(n, side, seed=0)
    jpegs = []
    for im in corpus.images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    pq.write_table(pa.table({"image": jpegs, "caption": corpus.captions}),
                   root / "pairs.parquet", row_group_size=max(n // 32, 16))
    with open(root / "texts.jsonl", "w") as f:
        for c in corpus.captions * 4:
            f.write(json.dumps({"text": c}) + "\n")
    SentencePieceTokenizer.train(corpus.captions, 128, root / "sp")
    small = synthetic.generate(min(n, 1000), 32, seed=0).images
    KMeansPatchVQ.fit(small, 256, 4, seed=0, iters=10).save(root / "vq.npz")


def bench_preprocess(root: Path, workers: list[int]) -> str:
    from megatron_t2i.data.preprocess import Settings, preprocess

    base = dict(text_tokenizer=("sentencepiece", str(root / "sp.model")), progress=False)
    for w in workers:
        cpu = _cpu_seconds()
        text = preprocess(Settings((str(root / "texts.jsonl"),), str(root / f"text{w}"),
                                   mode="text", image_vocab_size=256, workers=w, **base))
        cpu_t, cpu = _cpu_seconds() - cpu, _cpu_seconds()
        image = preprocess(Settings((str(root / "pairs.parquet"),), str(root / f"t2i{w}"),
                                    image_tokenizer=("kmeans", str(root / "vq.npz")),
                                    workers=w, **base))
        cpu_i = _cpu_seconds() - cpu
        print(f"preprocess  workers={w:<2d} captions/s {text.records / text.seconds:>8,.0f} "
              f"wall, {text.records / cpu_t:>8,.0f} per CPU-second | images/s "
              f"{image.records / image.seconds:>7,.0f} wall, {image.records / cpu_i:>7,.0f} per "
              f"CPU-second  [{image.records:,} images, {text.records:,} captions; whole runs: "
              f"tokenizer loading, workers, merge]", flush=True)
    return str(root / f"t2i{workers[0]}")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pool): a per-worker
    rate that does not depend on how busy the machine is."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_movqgan(root: Path, checkpoint: str, n: int) -> None:
    import torch

    from megatron_t2i.tokenizers.factory import load_image_tokenizer

    if not torch.cuda.is_available():
        print("movqgan     skipped: no CUDA device")
        return
    vq = load_image_tokenizer("movqgan", checkpoint)
    images = np.random.default_rng(0).integers(0, 256, (32, vq.image_size, vq.image_size, 3),
                                               dtype=np.uint8)
    vq.encode(images[:4])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        vq.encode(images)
        done += len(images)
    torch.cuda.synchronize()
    print(f"movqgan     images/s {done / (time.perf_counter() - t0):,.0f} "
          f"({vq.image_size}px, batch 32, {torch.cuda.get_device_name()})")


def bench_loader(prefix: str, samples: int, seq_length: int, micro_batch: int) -> None:
    import torch
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    from megatron_t2i.data.dataset import T2IDataset
    from megatron_t2i.data.indexed import read_sidecar
    from megatron_t2i.data.loader import collate
    from megatron_t2i.data.sampler import DataParallelSampler
    from megatron_t2i.vocab import VocabLayout

    layout = VocabLayout.from_dict(read_sidecar(prefix)["layout"])
    indexed = IndexedDataset(prefix, mmap=True)
    ours = T2IDataset(indexed, layout, seq_length, np.arange(len(indexed)), seed=0)
    sampler = DataParallelSampler(len(ours), 0, micro_batch, 0, 1, seed=0)
    cpu = torch.device("cpu")

    def run_ours() -> int:
        return sum(collate([ours[i] for i in next(sampler)], cpu)["tokens"].numel()
                   for _ in range(samples // micro_batch))

    config = GPTDatasetConfig(random_seed=0, sequence_length=seq_length,
                              tokenizer=_MegatronTokenizer(layout), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, split="100,0,0")
    theirs = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), samples,
                        Split.train, config)

    def run_theirs() -> int:
        tokens = 0
        for s in range(0, samples - micro_batch + 1, micro_batch):
            items = [theirs[i] for i in range(s, s + micro_batch)]
            tokens += torch.stack([it["tokens"] for it in items]).numel()
            for k in ("labels", "loss_mask", "position_ids"):
                torch.stack([it[k] for it in items])
        return tokens

    for name, fn in (("T2IDataset", run_ours), ("GPTDataset", run_theirs)):
        fn()  # warm the page cache and the caches of both
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        print(f"loader      {name:<11s} samples/s {samples / dt:>9,.0f} wall, "
              f"{samples / dc:>9,.0f} per CPU-second | tokens/s {tokens / dt:>12,.0f} wall  "
              f"[{samples:,} samples of {seq_length} tokens, shuffled, micro batch "
              f"{micro_batch}, one process]", flush=True)
        if name == "T2IDataset":
            bench_id_checks(indexed, layout, micro_batch, dc / (samples // micro_batch))


def bench_id_checks(indexed, layout, micro_batch: int, batch_seconds: float) -> None:
    """The per-sample modality range check (dataset.document_problem) on its own: its cost
    per micro batch, on these files and on paper-sized documents (100 caption tokens, 1,024
    image codes), against the loader's whole time per micro batch (which includes it). CPU
    seconds of this process, so that other load on the machine does not count."""
    from megatron_t2i.data.dataset import document_problem
    from megatron_t2i.data.documents import make_document

    docs = [np.asarray(indexed[i], dtype=np.int64) for i in range(micro_batch)]
    rng = np.random.default_rng(0)
    paper = [make_document(rng.integers(4, layout.text_size, 100),
                           rng.integers(0, layout.image_size, 1024), layout)
             for _ in range(micro_batch)]
    for what, batch in (("these files", docs), ("paper-sized", paper)):
        reps = 2000
        t0 = time.process_time()
        for _ in range(reps):
            for doc in batch:
                assert document_problem(doc, layout) is None
        per_batch = (time.process_time() - t0) / reps
        print(f"id checks   {what:<11s} {per_batch * 1e6:>8.1f} us CPU per micro batch of "
              f"{micro_batch} ({per_batch / batch_seconds:.1%} of the loader's "
              f"{batch_seconds * 1e3:.2f} ms CPU per micro batch here)", flush=True)


class _MegatronTokenizer:
    """The three attributes GPTDataset reads from a tokenizer."""

    def __init__(self, layout) -> None:
        self.vocab_size = layout.size
        self.eod = layout.eod_id
        self.pad = layout.pad_id
        self.unique_identifiers = {"class": "bench", "size": layout.size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--image-side", type=int, default=64, help="stored JPEGs (resized to 32)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--loader-samples", type=int, default=20000)
    p.add_argument("--seq-length", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--movqgan", help="a MoVQGAN checkpoint: also time it on a GPU")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_corpus(root, a.images, a.image_side)
        prefix = bench_preprocess(root, sorted(set(a.workers)))
        if a.movqgan:
            bench_movqgan(root, a.movqgan, 512)
        bench_loader(prefix, a.loader_samples, a.seq_length, a.micro_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
