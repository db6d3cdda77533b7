"""Adopt a text .bin/.idx written by Megatron-LM's preprocessing: write its .vocab.json sidecar.

    python tools/import_token_files.py data/pile_text --text-tokenizer openlm/tokenizer.json \
        --text-vocab-size 50432 --image-vocab-size 16384

One pass over the tokens records the smallest and largest id; an id outside the text
tokenizer's range is refused (exit 1) naming the file and the first document holding one.
--image-vocab-size must match the image-caption files the text is blended with.
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.data.importing import import_text_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="the token files' prefix (PREFIX.bin and PREFIX.idx)")
    p.add_argument("--text-tokenizer", required=True,
                   help="the sentencepiece .model or tokenizer.json the files were written with")
    p.add_argument("--text-tokenizer-kind", choices=["auto", "sentencepiece", "hf"],
                   default="auto")
    p.add_argument("--text-vocab-size", type=int,
                   help="HF tokenizers: the embedding rows of the LM (e.g. 50432 for GPT-NeoX)")
    p.add_argument("--image-vocab-size", type=int, required=True,
                   help="codebook size of the image-caption files this text is blended with")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sidecar")
    a = p.parse_args(argv)
    try:
        side = import_text_tokens(a.prefix, a.text_tokenizer, a.image_vocab_size,
                                  a.text_tokenizer_kind, a.text_vocab_size, a.overwrite)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lo_hi = side["id_range"] or ["-", "-"]
    print(f"wrote {a.prefix}.vocab.json: {side['num_documents']:,} text documents, "
          f"{side['num_tokens']:,} {side['imported']['dtype']} tokens, ids {lo_hi[0]}..{lo_hi[1]} "
          f"within the text range [0, {side['layout']['text_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
