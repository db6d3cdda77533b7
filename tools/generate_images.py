"""Generate images from captions with a checkpoint: KV-cached sampling, temperature, top-k,
top-p (over image codes only), classifier-free guidance (on an interval of steps); decoded by the image tokenizer into a PNG grid.

    python tools/generate_images.py --checkpoint runs/demo/checkpoints \
        --caption "a red circle at the top left" --captions-file more.txt \
        --guidance-scale 3 --temperature 1 --top-k 50 --top-p 0.95 --seed 0 --out samples/
    torchrun --nproc_per_node 2 tools/generate_images.py --tp 2 ...

Writes <out>/grid.png, <out>/images/NNNNN.png and <out>/samples.npz (codes, images,
captions). Pipeline parallelism is not used for generation (the checkpoint is resharded to
PP = 1 on load). See megatron_t2i/eval/generate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint root or iter_N folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--caption", action="append", default=[], help="repeatable")
    parser.add_argument("--captions-file", default=None, help="one caption per line")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance; 1 = none")
    parser.add_argument("--guidance-interval", type=int, default=0,
                        help="guide only the first N image tokens; 0 = all")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-tokenizer", default=None, help="default: the run's")
    parser.add_argument("--image-tokenizer", default=None,
                        help="KMeansPatchVQ .npz, VQ-VAE .safetensors or MoVQGAN checkpoint "
                             "(default: the run's)")
    parser.add_argument("--image-tokenizer-kind", default=None,
                        choices=["kmeans", "movqgan", "vqvae"])
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="recompute the whole sequence every step (slow; a reference)")
    args = parser.parse_args(argv)
    captions = list(args.caption)
    if args.captions_file:
        lines = Path(args.captions_file).read_text(encoding="utf-8").splitlines()
        captions += [ln.strip() for ln in lines if ln.strip()]
    if not captions:
        parser.error("no captions: give --caption and/or --captions-file")
    from megatron_t2i.eval.cli import run_tool
    from megatron_t2i.eval.generate import SamplingParams, generate_images

    def emit(report: dict) -> None:
        report["captions"] = captions
        Path(args.out, "report.json").write_text(json.dumps(report) + "\n")
        print(f"wrote {report['num_images']} images to {args.out}", flush=True)

    return run_tool(
        lambda: generate_images(
            args.checkpoint, captions, args.out, args.tp,
            SamplingParams(args.temperature, args.top_k, args.top_p, args.seed),
            args.guidance_scale, args.batch_size, args.text_tokenizer, args.image_tokenizer,
            args.image_tokenizer_kind, use_kv_cache=not args.no_kv_cache,
            guidance_interval=args.guidance_interval),
        emit)


if __name__ == "__main__":
    sys.exit(main())
