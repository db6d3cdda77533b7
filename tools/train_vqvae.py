#!/usr/bin/env python
"""Train the small VQ autoencoder image tokenizer (megatron_t2i/tokenizers/vqvae.py) on CPU.

    # on any image-caption jsonl (the preprocess format):
    python tools/train_vqvae.py --data train.jsonl --out vq.safetensors --setting quick
    # on the mini-study's Fashion-MNIST mosaics (built, or reused, in DIR):
    python tools/train_vqvae.py --fashion DIR --out vq.safetensors --setting full --downsample 8

Writes vq.safetensors + vq.json, then prints the reconstruction MSE (pixels in [0, 1]) on the
training images and on --eval-data (with --fashion: the valid split), the codebook perplexity,
dead codes and training time (wall and CPU seconds). A rerun with the same images and settings
reuses the saved model (its .json records a content hash of the training images).
Use with: tools/preprocess_data.py --image-tokenizer vqvae:vq.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# steps, batch size: quick fits about a minute of one idle core, full about five
SETTINGS = {"quick": (300, 64), "full": (1500, 64)}
STUDY_SEED = 1234  # the mini-study's corpus seed
MEASURED = 512  # images the quality figures are computed on


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", help="image-caption jsonl/tar/parquet inputs")
    src.add_argument("--fashion", type=Path, metavar="DIR",
                     help="build (or reuse) the Fashion-MNIST mosaic corpus in DIR, train on "
                          "its train split and evaluate on its valid split")
    p.add_argument("--mosaics", type=int, default=2000, help="with --fashion: training mosaics "
                   "(valid and test get a tenth each)")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out images to measure")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors to write")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="quick")
    p.add_argument("--steps", type=int, default=None, help="overrides the setting's")
    p.add_argument("--batch-size", type=int, default=None, help="overrides the setting's")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--downsample", type=int, default=4, help="4: 16x16 codes; 8: 8x8")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=100_000, help="training images at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if a.out.suffix != ".safetensors":
        p.error(f"--out {a.out}: expected a .safetensors path (its config goes beside it)")
    steps, batch = SETTINGS[a.setting]
    steps, batch = a.steps or steps, a.batch_size or batch
    try:
        figures = run(a, steps, batch)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"train_vqvae: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(figures, indent=1))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def run(a: argparse.Namespace, steps: int, batch: int) -> dict:
    from megatron_t2i.data.preprocess import collect_images
    from megatron_t2i.tokenizers import vqvae

    train, held_out = a.data, a.eval_data
    if a.fashion is not None:
        from megatron_t2i.experiments.study import fashion

        extra = max(a.mosaics // 10, 1)
        fashion.build_mosaic_corpus(a.fashion, counts={"train": a.mosaics, "valid": extra,
                                                       "test": extra},
                                    image_size=a.image_size, seed=STUDY_SEED)
        train, held_out = [str(a.fashion / "train.jsonl")], [str(a.fashion / "valid.jsonl")]
    images = collect_images(train, a.image_size, a.limit)
    model = vqvae.train_vqvae(images, codebook_size=a.codebook_size, downsample=a.downsample,
                              steps=steps, batch_size=batch, seed=a.seed, cache=a.out,
                              log_every=max(steps // 10, 1))
    tok = vqvae.VQVAETokenizer(model)
    usage = vqvae.codebook_usage(tok, images[:MEASURED])
    record = model.training_record
    figures = {"out": str(a.out), "reused": model.from_cache, "train_images": len(images),
               "steps": steps, "batch_size": batch, "codes_per_image": tok.tokens_per_image,
               "codebook_size": tok.codebook_size,
               "reconstruction_mse_train": vqvae.reconstruction_mse(tok, images[:MEASURED]),
               "codebook_perplexity": usage["perplexity"], "dead_codes": usage["dead_codes"],
               "used_codes": usage["used"], "top_code_share": usage["top_share"],
               "train_seconds": record.get("train_seconds"),
               "train_cpu_seconds": record.get("train_cpu_seconds")}
    if held_out:
        valid = collect_images(held_out, a.image_size, MEASURED)
        figures["reconstruction_mse_held_out"] = vqvae.reconstruction_mse(tok, valid)
    return figures


if __name__ == "__main__":
    sys.exit(main())
