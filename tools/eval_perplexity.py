"""Perplexity per modality (text, image) on a checkpoint's validation split, at any TP / PP.

    python tools/eval_perplexity.py --checkpoint runs/demo/checkpoints --out ppl.json
    torchrun --nproc_per_node 4 tools/eval_perplexity.py --checkpoint CKPT --tp 2 --pp 2
    ... --text-file heldout.txt        # also perplexity on held-out text

Prints (and writes with --out) a JSON report: loss, loss_text, loss_image, ppl, ppl_text,
ppl_image and token counts. See megatron_t2i/eval/perplexity.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint root or iter_N folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--text-file", default=None, help="held-out text, one document a line")
    parser.add_argument("--text-tokenizer", default=None,
                        help="sentencepiece .model or tokenizer.json (default: the run's)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    from megatron_t2i.eval.cli import print_report, run_tool
    from megatron_t2i.eval.perplexity import evaluate_perplexity

    return run_tool(
        lambda: evaluate_perplexity(args.checkpoint, args.tp, args.pp, args.max_samples,
                                    args.text_file, args.text_tokenizer, args.micro_batch_size),
        lambda report: print_report(report, args.out))



if __name__ == "__main__":
    sys.exit(main())
