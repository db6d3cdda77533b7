"""Perplexity per modality (text, image) on a checkpoint's validation split, at any TP / PP.

    python tools/eval_perplexity.py --checkpoint runs/demo/checkpoints --out ppl.json
    torchrun --nproc_per_node 4 tools/eval_perplexity.py --checkpoint CKPT --tp 2 --pp 2
    ... --text-file heldout.txt        # also perplexity on held-out text

Prints (and writes with --out) a JSON report: loss, loss_text, loss_image, ppl, ppl_text,
ppl_image and token counts. See megatron_t2i/eval/perplexity.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from megatron_t2i.eval import loading
    from megatron_t2i.eval.perplexity import evaluate_perplexity
    from megatron_t2i.training.checkpointing import CheckpointError

    try:
        report = evaluate_perplexity(args.checkpoint, args.tp, args.pp, args.max_samples,
                                     args.text_file, args.text_tokenizer, args.micro_batch_size)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        loading.close()
    if loading.is_writer():
        _emit(report, args.out)
    return 0


def _emit(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
