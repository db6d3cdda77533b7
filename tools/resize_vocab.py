"""Vocabulary surgery: add image codes and specials to a trainer checkpoint, re-pad for a TP.

    python tools/resize_vocab.py SOURCE OUT [--image-size 16384] [--tp 2]
        [--init normal|mean|mean_std|file] [--init-file rows.safetensors] [--keep-optimizer]

Text rows stay bit-identical; old padding rows are dropped; tensors other than the word
embeddings and output layer stream through one at a time. SOURCE is never modified; OUT
appears only when complete.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint root (with `latest`) or an iter_NNNNNNN folder")
    p.add_argument("output", help="new checkpoint root")
    p.add_argument("--image-size", type=int, default=16384, help="image codes in the new layout")
    p.add_argument("--specials", default="<boi>,<eoi>", help="comma-separated added specials")
    p.add_argument("--tp", type=int, default=None, help="target TP (default: the source's)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    p.add_argument("--padded-vocab-size", type=int, default=None,
                   help="explicit padded size instead of the divisor x TP rule")
    p.add_argument("--init", choices=("normal", "mean", "mean_std", "file"), default="normal")
    p.add_argument("--init-file", help="rows for the new image codes (--init file)")
    p.add_argument("--init-std", type=float, default=None,
                   help="std of --init normal (default: the model's init_method_std)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--keep-optimizer", action="store_true",
                   help="grow the optimizer moments with zeros instead of dropping them")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from megatron_t2i.checkpoint.layout import TOOL_INPUT_ERRORS, tool_error
    from megatron_t2i.checkpoint.surgery import resize_vocab

    try:
        stats = resize_vocab(
            args.source, args.output, args.image_size,
            [s for s in args.specials.split(",") if s], args.tp,
            args.make_vocab_size_divisible_by, args.padded_vocab_size, args.init,
            args.init_file, args.init_std, args.seed, args.keep_optimizer, args.overwrite)
    except TOOL_INPUT_ERRORS as err:
        return tool_error(err, args.source)
    layout = stats.extra["layout"]
    print(f"resize_vocab: wrote {args.output}: {stats.summary()}")
    print(f"vocabulary: {layout.size} ids ({layout.text_size} text, {layout.image_size} image, "
          f"{list(layout.added_specials)}) padded to {stats.extra['padded_vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
