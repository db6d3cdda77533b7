"""Image tokenization speed: decode images/s per CPU core, MoVQGAN encode images/s per
device with decode workers feeding it, which of the two is the bottleneck, and the projected
hours for the paper's corpus (prints figures and a JSON line).

    python tools/bench_preprocess.py --quick                  # CPU: 64 px images, tiny counts
    python tools/bench_preprocess.py --device cuda --workers 8 --batch 64   # one GPU, 256 px

Inputs are webdataset tars of photo-like JPEGs (smooth colour fields plus grain, 512x384,
quality 90) with captions, written to a temporary folder. Decoding is preprocessing's own
decode worker (`DecodedChunks` / `decode_task`: read the tar, tokenize the caption, decode,
RGB, resize the shorter side, centre-crop, chunks of --batch images); the encoder is MoVQGAN-270M's architecture (--preset) with random weights (the speed does
not depend on the weights). Three measurements:
  decode   one process decodes --images records to 256 px (the paper's size): images/s per core;
  encode   the encoder alone on ready tensors: images/s per device;
  pipeline --workers DataLoader processes decode while the encoder runs: images/s per device
           (--workers 1 decodes in the encoding process, as preprocessing does).
The bottleneck is decoding when the workers' decode rate is below the encoder's rate.
Projected hours = --corpus images / (pipeline rate x --devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megatron_t2i.data.preprocess import (
    Chunk,
    DecodedChunks,
    Settings,
    Task,
    decode_task,
    expand_inputs,
    load_tokenizers,
    plan_tasks,
)
from megatron_t2i.tokenizers.movqgan import PRESETS, MoVQGAN, count_parameters
from megatron_t2i.tokenizers.text import SentencePieceTokenizer

PAPER_SIZE = 256  # MoVQGAN's input resolution in the paper


def photo_jpegs(count: int, width: int = 512, height: int = 384, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs that compress like photographs (flat synthetic shapes decode faster)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        field = np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 12, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_corpus(root: Path, tasks: int, per_task: int) -> Settings:
    """`tasks` webdataset tars of `per_task` JPEG-caption records (one preprocessing task
    each) and a sentencepiece model; the Settings preprocessing's decode workers take."""
    jpegs, captions = photo_jpegs(16), []
    for t in range(tasks):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(per_task):
                caption = f"photo {t} {i} of a {('red', 'blue', 'green')[i % 3]} field with grain"
                captions.append(caption)
                for name, blob in ((f"{i:06d}.jpg", jpegs[(t + i) % len(jpegs)]),
                                   (f"{i:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    SentencePieceTokenizer.train(captions, 64, root / "sp")
    # decode workers never load the image tokenizer; the encoder here is built in `measure`
    return Settings(inputs=(str(root),), output_prefix=str(root / "unused"),
                    text_tokenizer=("sentencepiece", str(root / "sp.model")),
                    image_tokenizer=("movqgan", "random weights"), progress=False)


def decode_rate(settings: Settings, tasks: list[Task], size: int, images: int) -> float:
    """Images/s of one process (one core) reading, caption-tokenizing and decoding records
    to `size` px, as a decode worker does (preprocessing's `decode_task`)."""
    text = load_tokenizers(settings, image=False)[0]
    done, t = 0, time.perf_counter()
    for task in itertools.cycle(tasks):
        for chunk in decode_task(task, settings, text, size):
            done += len(chunk.captions)
        if done >= images:
            return done / (time.perf_counter() - t)
    raise AssertionError("unreachable")


def _timed(tok: MoVQGAN, fn) -> float:
    if tok.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if tok.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def encode_rate(tok: MoVQGAN, batches: int) -> float:
    """Images/s of the encoder alone on ready uint8 images (after one warm-up batch)."""
    r = tok.image_size
    images = np.random.default_rng(0).integers(0, 256, (tok.batch_size, r, r, 3), np.uint8)
    tok.encode(images)
    seconds = _timed(tok, lambda: [tok.encode(images) for _ in range(batches)])
    return batches * tok.batch_size / seconds


def _keep(chunk: Chunk) -> Chunk:
    return chunk


def pipeline_rate(tok: MoVQGAN, settings: Settings, tasks: list[Task], workers: int
                  ) -> tuple[float, int]:
    """(images/s, images timed) with `workers` DataLoader processes decoding (preprocessing's
    `DecodedChunks`) while the encoder encodes each chunk, as `encode_tasks` does."""
    loader = torch.utils.data.DataLoader(
        DecodedChunks(settings, tasks, tok.image_size), batch_size=None,
        num_workers=workers if workers > 1 else 0, pin_memory=tok.device.type == "cuda",
        collate_fn=_keep)
    it = iter(loader)
    tok.encode(next(it).pixels.numpy())  # warm-up, and the workers are up and running
    done = 0

    def rest() -> None:
        nonlocal done
        for chunk in it:
            if chunk.pixels is not None:
                tok.encode(chunk.pixels.numpy())
                done += len(chunk.pixels)

    seconds = _timed(tok, rest)  # before reading `done`, which rest() counts up
    return done / seconds, done


def measure(args: argparse.Namespace) -> dict:
    cfg = PRESETS[args.preset]
    if args.image_size != cfg.resolution:  # same architecture, smaller pictures
        cfg = type(cfg)(**{**cfg.__dict__, "resolution": args.image_size})
    tok = MoVQGAN.from_config(cfg, device=args.device, batch_size=args.batch)
    # enough tasks that every worker has some; (batches + 1) chunks of images in all
    n_tasks = 2 * max(args.workers, 1)
    per_task = max(-(-(args.batches + 1) * args.batch // n_tasks), args.batch)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        settings = write_corpus(Path(tmp), n_tasks, per_task)
        settings = dataclasses.replace(settings, workers=args.workers, batch_size=args.batch)
        tasks = plan_tasks(expand_inputs(settings.inputs))
        per_core = decode_rate(settings, tasks, PAPER_SIZE, args.images)
        at_size = per_core if args.image_size == PAPER_SIZE else \
            decode_rate(settings, tasks, args.image_size, args.images)
        encode = encode_rate(tok, args.batches)
        pipeline, timed = pipeline_rate(tok, settings, tasks, args.workers)
    feed = at_size * max(args.workers, 1)  # what the workers could decode, at most
    hours = args.corpus / (pipeline * args.devices) / 3600
    return {
        "device": torch.cuda.get_device_name(tok.device) if tok.device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "encoder": f"MoVQGAN-{args.preset} architecture ({count_parameters(cfg) / 1e6:.0f}M params), "
                   f"random weights, {args.image_size} px, batch {args.batch}",
        "decode_images_per_s_per_core_256px": round(per_core, 1),
        "decode_images_per_s_per_core_at_size": round(at_size, 1),
        "encode_images_per_s": round(encode, 2),
        "pipeline_images_per_s": round(pipeline, 2),
        "pipeline_images": timed, "corpus_records": n_tasks * per_task,
        "workers": args.workers,
        "workers_needed_to_feed_encoder": int(np.ceil(encode / at_size)),
        "bottleneck": "decoding" if feed < encode else "encoder",
        "projected_hours": round(hours, 1),
        "corpus_images": args.corpus, "devices": args.devices,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: 64 px images, batch 4, 3 batches, 64 decoded images")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="270M",
                    help="MoVQGAN architecture (the paper's is 270M)")
    ap.add_argument("--workers", type=int, default=8, help="decode workers per device")
    ap.add_argument("--batch", type=int, default=64, help="images per encode call")
    ap.add_argument("--batches", type=int, default=20, help="timed encode batches")
    ap.add_argument("--images", type=int, default=400,
                    help="images (at least) in the per-core decode test")
    ap.add_argument("--image-size", type=int, default=PAPER_SIZE)
    ap.add_argument("--corpus", type=int, default=134_000_000, help="images to project for")
    ap.add_argument("--devices", type=int, default=32, help="devices to project for")
    args = ap.parse_args()
    if args.quick:
        args.image_size, args.batch, args.batches, args.images = 64, 4, 3, 64
        args.workers = min(args.workers, 2)
    r = measure(args)
    print(f"{r['encoder']} on {r['device']}")
    print(f"  decode (JPEG 512x384 -> 256 px): {r['decode_images_per_s_per_core_256px']} "
          f"images/s per core")
    print(f"  encode alone: {r['encode_images_per_s']} images/s; with {r['workers']} decode "
          f"workers: {r['pipeline_images_per_s']} images/s")
    print(f"  bottleneck: {r['bottleneck']} ({r['workers_needed_to_feed_encoder']} workers "
          f"decode as fast as the encoder encodes)")
    print(f"  projected: {r['projected_hours']} h for {r['corpus_images']:,} images on "
          f"{r['devices']} devices at the pipeline rate")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
