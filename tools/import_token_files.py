"""Adopt a text .bin/.idx written by Megatron-LM's preprocessing: write its .vocab.json sidecar.

    python tools/import_token_files.py data/pile_text --text-tokenizer openlm/tokenizer.json \
        --text-vocab-size 50432 --image-vocab-size 16384

One pass over the tokens records the smallest and largest id; an id outside the text
tokenizer's range is refused (exit 1) naming the file and the first document holding one.
--image-vocab-size must match the image-caption files the text is blended with.

    python tools/import_token_files.py data/cc_t2i --add-id-range

adds the id range (after the same pass) to the sidecar of files this code wrote before
sidecars recorded one, which training otherwise refuses.
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.data.importing import add_id_range, import_text_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="the token files' prefix (PREFIX.bin and PREFIX.idx)")
    p.add_argument("--text-tokenizer",
                   help="the sentencepiece .model or tokenizer.json the files were written with")
    p.add_argument("--text-tokenizer-kind", choices=["auto", "sentencepiece", "hf"],
                   default="auto")
    p.add_argument("--text-vocab-size", type=int,
                   help="HF tokenizers: the embedding rows of the LM (e.g. 50432 for GPT-NeoX)")
    p.add_argument("--image-vocab-size", type=int,
                   help="codebook size of the image-caption files this text is blended with")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sidecar")
    p.add_argument("--add-id-range", action="store_true",
                   help="only add the id range to the existing sidecar of older token files")
    a = p.parse_args(argv)
    if a.add_id_range:
        return _add_id_range(a.prefix)
    if not a.text_tokenizer or a.image_vocab_size is None:
        p.error("--text-tokenizer and --image-vocab-size are required (unless --add-id-range)")
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



def _add_id_range(prefix: str) -> int:
    try:
        side = add_id_range(prefix)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"added id_range {side['id_range']} ({side['mode']} files) to {prefix}.vocab.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
