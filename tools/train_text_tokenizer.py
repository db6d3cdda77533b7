"""Train a sentencepiece BPE model on the captions (or texts) of a corpus.

    python tools/train_text_tokenizer.py --input data/captions.jsonl --vocab-size 32000 \
        --model-prefix data/sp32k          # writes data/sp32k.model

Ids 0-3 are unk, bos, eos, pad; the model has exactly --vocab-size ids.
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.data.preprocess import format_skips, iter_texts
from megatron_t2i.tokenizers.text import SentencePieceTokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl / .tar / .parquet files, or folders of them")
    p.add_argument("--field", default="caption", help="the caption or text field/column")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--max-texts", type=int, default=None)
    a = p.parse_args(argv)
    skipped: list[tuple[str, str, str]] = []
    texts = list(iter_texts(a.input, a.field, a.max_texts, skipped))
    if skipped:
        print(format_skips(skipped), file=sys.stderr)
    if not texts:
        print(f"error: no non-empty {a.field!r} in {a.input}", file=sys.stderr)
        return 1
    tok = SentencePieceTokenizer.train(texts, a.vocab_size, a.model_prefix)
    print(f"trained a {tok.vocab_size}-id sentencepiece BPE model on {len(texts):,} texts: "
          f"{a.model_prefix}.model (identity {tok.identity()[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
