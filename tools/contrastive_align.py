"""Contrastive alignment: learn image-code embeddings in a pretrained LM's text-embedding space.

    python tools/contrastive_align.py --text-embeddings ckpt/openlm_1b --data data/coco_tokens \
        --out runs/align [--text-tokenizer tokenizer.json] [--steps 1000] [--batch-size 256]

Writes <out>/alignment_metrics.jsonl (loss and temperature per step), <out>/image_rows.
safetensors (`word_embeddings` [image codes, hidden]: the rows tools/resize_vocab.py
--init file takes) and <out>/nearest_text_tokens.json (each code's nearest text tokens).
See megatron_t2i/experiments/alignment/contrastive.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_t2i.experiments.alignment.contrastive import AlignConfig

    d = AlignConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-embeddings", required=True,
                   help="trainer checkpoint (root or iter_N) or a .safetensors / .pt table")
    p.add_argument("--tensor-name", help="the table's name in a file holding several tensors")
    p.add_argument("--data", required=True, help="token-file prefix (.bin/.idx/.vocab.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text-tokenizer", help="sentencepiece .model or HF tokenizer.json, to "
                   "print the nearest tokens as strings")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--init-temperature", type=float, default=d.init_temperature)
    p.add_argument("--init-std", type=float, default=d.init_std)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-interval", type=int, default=d.log_interval)
    p.add_argument("--device", default=d.device)
    args = p.parse_args(argv)

    from megatron_t2i.experiments.alignment.contrastive import (
        NEAREST_FILE,
        ROWS_FILE,
        AlignmentError,
        align,
        load_text_embeddings,
        read_pairs,
    )

    cfg = AlignConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, init_temperature=args.init_temperature,
                      init_std=args.init_std, seed=args.seed, log_interval=args.log_interval,
                      top_k=args.top_k, device=args.device)
    try:
        table = load_text_embeddings(args.text_embeddings, args.tensor_name)
        pairs = read_pairs(args.data)
        tokenizer = None
        if args.text_tokenizer:
            from megatron_t2i.tokenizers.factory import load_text_tokenizer

            tokenizer = load_text_tokenizer("auto", args.text_tokenizer)
        print(f"contrastive_align: {len(pairs)} image-caption pairs, text table "
              f"{tuple(table.shape)}, {pairs.layout.image_size} image codes", flush=True)
        result = align(table, pairs, cfg, args.out, tokenizer)
    except (AlignmentError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    s = result.nearest["summary"]
    print(f"contrastive_align: final loss {result.losses[-1]:.4f}, temperature "
          f"{result.temperatures[-1]:.4f}; wrote {args.out}/{ROWS_FILE} and {NEAREST_FILE}; "
          f"{s['distinct_top1_tokens']} distinct nearest text tokens over "
          f"{s['image_codes']} codes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
