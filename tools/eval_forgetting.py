"""Forgetting of text skills (the paper's Table 1) for any checkpoint, at any TP (/ PP).

    python tools/eval_forgetting.py --checkpoint CKPT --text-file heldout.txt \
        --prompts prompts.txt --completions-out completions.jsonl \
        --task hellaswag.jsonl --task arc_easy.jsonl --task piqa.jsonl --out forgetting.json

Held-out text perplexity, greedy completions of one prompt per line (needs --pp 1), and
multiple-choice accuracy (acc, acc_norm) by likelihood on local jsonl files in the HellaSwag,
ARC or PIQA layout. See megatron_t2i/eval/forgetting.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint root or iter_N folder")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--text-file", default=None, help="held-out text for perplexity")
    parser.add_argument("--prompts", default=None, help="one prompt per line, completed greedily")
    parser.add_argument("--completions-out", default=None, help="jsonl of prompt + completion")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--task", action="append", default=[],
                        help="multiple-choice jsonl (HellaSwag / ARC / PIQA layout); repeatable")
    parser.add_argument("--text-tokenizer", default=None,
                        help="sentencepiece .model or tokenizer.json (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--text-window", type=int, default=None,
                        help="tokens per held-out window (default: the model's seq_length)")
    parser.add_argument("--per-item", action="store_true",
                        help="also each held-out window's loss (for intervals over items)")
    args = parser.parse_args(argv)
    if not (args.text_file or args.prompts or args.task):
        parser.error("nothing to evaluate: give --text-file, --prompts and/or --task")
    from megatron_t2i.eval.cli import print_report, run_tool
    from megatron_t2i.eval.forgetting import evaluate_forgetting

    return run_tool(
        lambda: evaluate_forgetting(
            args.checkpoint, args.tp, args.pp, args.text_file, args.prompts, tuple(args.task),
            args.text_tokenizer, args.max_new_tokens, args.completions_out,
            args.micro_batch_size, args.per_item, args.text_window),
        lambda report: print_report(report, args.out))


if __name__ == "__main__":
    sys.exit(main())
