"""Image-caption corpora -> Megatron indexed token files (a shard set + .vocab.json sidecar).

    python tools/preprocess_data.py --input data/cc/*.tar --output-prefix data/cc_t2i \
        --text-tokenizer openlm/tokenizer.json --text-vocab-size 50432 \
        --image-tokenizer movqgan:movqgan_270M.ckpt --workers 8 --batch-size 64

    torchrun --nproc-per-node 8 tools/preprocess_data.py ...   # one encoder per GPU
    sbatch --nodes 4 slurm/preprocess.sbatch ...               # over nodes (srun)

Writes PREFIX.shards/ (one .bin/.idx per task), PREFIX.shards.json and PREFIX.vocab.json;
--merge writes one PREFIX.bin/.idx instead. Rerunning the same command resumes: committed
shards are kept. See megatron_t2i/data/preprocess.py and docs/data-at-scale.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.data.preprocess import TASK_BYTES, Settings, format_summary, preprocess
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
    p.add_argument("--workers", type=int, default=1,
                   help="decode workers (read, caption-tokenize, decode images) per encoder "
                        "process; 1 decodes in the encoder process itself")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per image-tokenizer call (part of the resume fingerprint)")
    p.add_argument("--task-bytes", type=int, default=TASK_BYTES,
                   help="bytes of a jsonl input per task (a tar or a parquet row group is one)")
    p.add_argument("--merge", action="store_true",
                   help="write one PREFIX.bin/.idx (one process copies every shard) instead "
                        "of the shard set")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for flag in ("workers", "batch_size", "task_bytes"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
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
                    a.batch_size, progress=not a.no_progress, task_bytes=a.task_bytes,
                    merge=a.merge)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        summary = preprocess(settings)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary is not None:  # rank 0 of a job
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
