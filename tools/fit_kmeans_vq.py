"""Fit the k-means patch VQ (the CPU image tokenizer of the demo) on a corpus's images.

    python tools/fit_kmeans_vq.py --input data/train.jsonl --image-size 32 --patch-size 4 \
        --codebook-size 256 --output data/vq256.npz
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.data.preprocess import collect_images, format_skips
from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--image-key", default="image")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--patch-size", type=int, required=True)
    p.add_argument("--codebook-size", type=int, required=True)
    p.add_argument("--max-images", type=int, default=10000)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    skipped: list[tuple[str, str, str]] = []
    try:
        images = collect_images(a.input, a.image_size, a.max_images, a.image_key, skipped)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if skipped:
            print(format_skips(skipped), file=sys.stderr)
    vq = KMeansPatchVQ.fit(images, a.codebook_size, a.patch_size, a.seed, a.iters)
    vq.save(a.output)
    print(f"fitted a {vq.codebook_size}-code k-means patch VQ on {len(images):,} images "
          f"({vq.tokens_per_image} codes each): {a.output} (identity {vq.identity()[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
