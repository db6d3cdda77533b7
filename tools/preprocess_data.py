"""Image-caption corpora -> Megatron indexed token files (.bin/.idx + .vocab.json sidecar).

    python tools/preprocess_data.py --input data/cc/*.tar --output-prefix data/cc_t2i \
        --text-tokenizer openlm/tokenizer.json --text-vocab-size 50432 \
        --image-tokenizer movqgan:movqgan_270M.ckpt --workers 16

See megatron_t2i/data/preprocess.py for the input formats and modes.
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.data.preprocess import Settings, format_summary, preprocess
from megatron_t2i.tokenizers.factory import IMAGE_KINDS


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl / .tar / .parquet files, or folders of them")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--mode", choices=["conditional", "unconditional", "text"],
                   default="conditional")
    p.add_argument("--text-tokenizer", required=True,
                   help="a sentencepiece .model or a Hugging Face tokenizer.json")
    p.add_argument("--text-tokenizer-kind", choices=["auto", "sentencepiece", "hf"],
                   default="auto")
    p.add_argument("--text-vocab-size", type=int,
                   help="HF tokenizers: the embedding rows of the LM (e.g. 50432 for GPT-NeoX)")
    p.add_argument("--image-tokenizer", metavar="KIND:PATH",
                   help=f"KIND one of {list(IMAGE_KINDS)}, e.g. kmeans:vq.npz")
    p.add_argument("--image-vocab-size", type=int,
                   help="text mode without --image-tokenizer: codebook size of the layout")
    p.add_argument("--image-key", default="image")
    p.add_argument("--caption-key", default="caption")
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    image = None
    if a.image_tokenizer:
        kind, sep, path = a.image_tokenizer.partition(":")
        if not sep or kind not in IMAGE_KINDS:
            p.error(f"--image-tokenizer {a.image_tokenizer!r}: expected KIND:PATH with KIND "
                    f"one of {list(IMAGE_KINDS)}")
        image = (kind, path)
    options = (("vocab_size", a.text_vocab_size),) if a.text_vocab_size else ()
    return Settings(tuple(a.input), a.output_prefix, a.mode,
                    (a.text_tokenizer_kind, a.text_tokenizer), options, image,
                    a.image_vocab_size, a.image_key, a.caption_key, a.text_key, a.workers,
                    a.batch_size, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        summary = preprocess(settings)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
