"""Image tokenization speed: decode images/s per CPU core, MoVQGAN encode images/s per
device with decode workers feeding it, which of the two is the bottleneck, and the projected
hours for the paper's corpus (prints figures and a JSON line).

    python tools/bench_preprocess.py --quick                  # CPU: 64 px images, tiny counts
    python tools/bench_preprocess.py --device cuda --workers 8 --batch 64   # one GPU, 256 px

Inputs are photo-like JPEGs (smooth colour fields plus grain, 512x384, quality 90) made in
memory. Decoding is preprocessing's own `load_image` (decode, RGB, resize the shorter side,
centre-crop); the encoder is MoVQGAN-270M's architecture (--preset) with random weights (the speed does
not depend on the weights). Three measurements:
  decode   one process decodes --images JPEGs to 256 px (the paper's size): images/s per core;
  encode   the encoder alone on ready tensors: images/s per device;
  pipeline --workers DataLoader processes decode while the encoder runs: images/s per device.
The bottleneck is decoding when the workers' decode rate is below the encoder's rate.
Projected hours = --corpus images / (pipeline rate x --devices).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from megatron_t2i.data.preprocess import load_image
from megatron_t2i.tokenizers.movqgan import PRESETS, MoVQGAN, count_parameters

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


class DecodeDataset(torch.utils.data.Dataset):
    """Item i: JPEG i (cycling over the distinct ones) decoded to size x size uint8."""

    def __init__(self, jpegs: list[bytes], count: int, size: int) -> None:
        self.jpegs, self.count, self.size = jpegs, count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        # a copy: the array views Pillow's read-only buffer, which torch will not wrap
        return torch.from_numpy(load_image(self.jpegs[i % len(self.jpegs)], self.size).copy())


def decode_rate(jpegs: list[bytes], count: int, size: int) -> float:
    """Images/s of one process (one core) decoding to `size` px."""
    load_image(jpegs[0], size)
    t = time.perf_counter()
    for i in range(count):
        load_image(jpegs[i % len(jpegs)], size)
    return count / (time.perf_counter() - t)


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


def pipeline_rate(tok: MoVQGAN, jpegs: list[bytes], batches: int, workers: int) -> float:
    """Images/s with `workers` DataLoader processes decoding while the encoder runs."""
    dataset = DecodeDataset(jpegs, (batches + 1) * tok.batch_size, tok.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tok.batch_size, num_workers=workers,
        pin_memory=tok.device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False)
    it = iter(loader)
    tok.encode(next(it).numpy())  # warm-up, and the workers are up and running

    def rest() -> None:
        for batch in it:
            tok.encode(batch.numpy())

    return batches * tok.batch_size / _timed(tok, rest)


def measure(args: argparse.Namespace) -> dict:
    cfg = PRESETS[args.preset]
    if args.image_size != cfg.resolution:  # same architecture, smaller pictures
        cfg = type(cfg)(**{**cfg.__dict__, "resolution": args.image_size})
    tok = MoVQGAN.from_config(cfg, device=args.device, batch_size=args.batch)
    jpegs = photo_jpegs(16)
    per_core = decode_rate(jpegs, args.images, PAPER_SIZE)
    at_size = per_core if args.image_size == PAPER_SIZE else \
        decode_rate(jpegs, args.images, args.image_size)
    encode = encode_rate(tok, args.batches)
    pipeline = pipeline_rate(tok, jpegs, args.batches, args.workers)
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
    ap.add_argument("--images", type=int, default=400, help="images in the per-core decode test")
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
