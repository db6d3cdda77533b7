"""The embedded demo corpus: synthetic shapes -> tokenizers -> token files, cached.

With `data.data_path` unset the trainer calls `prepare_demo_corpus`: on first use it draws the
synthetic corpus, trains a sentencepiece BPE model on the captions and a k-means patch VQ on
the images, and writes `[bos] caption [boi] codes [eoi]` documents through `write_indexed`.

Each set of generation parameters has its own folder `<cache_dir>/demo-<hash>/` holding a
`params.json` that records them. A folder is built under a temporary name and renamed into
place, so a killed run never leaves a half-written corpus that looks complete; calling again
(other ranks after a barrier, a later run) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_t2i.config import DataConfig, check_demo_corpus
from megatron_t2i.data import synthetic
from megatron_t2i.data.documents import make_document
from megatron_t2i.data.indexed import paths, write_indexed
from megatron_t2i.files import publish_folder
from megatron_t2i.tokenizers.kmeans import KMeansPatchVQ
from megatron_t2i.tokenizers.text import SentencePieceTokenizer
from megatron_t2i.vocab import VocabLayout

FORMAT = 2  # bump when the generation changes, so old caches are not reused
KMEANS_ITERS = 20
_FILES = {"text": "text.model", "image": "image_vq.npz", "tokens": "tokens",
          "params": "params.json"}


def prepare_demo_corpus(data_cfg: DataConfig, seed: int
                        ) -> tuple[str, VocabLayout, SentencePieceTokenizer, KMeansPatchVQ]:
    """Generate (first use) or reuse the demo token files; returns their prefix, the layout
    and both tokenizers. Idempotent: safe to call again from every rank."""
    params = generation_params(data_cfg, seed)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(data_cfg.cache_dir)
    folder = root / f"demo-{key}"
    if not _complete(folder, params):
        if folder.exists():
            print(f"demo corpus: {folder} is incomplete or stale; regenerating", flush=True)
            shutil.rmtree(folder)
        _generate_into(folder, params)
    else:
        print(f"demo corpus: reusing {folder}", flush=True)
    text = SentencePieceTokenizer.load(folder / _FILES["text"])
    image = KMeansPatchVQ.load(folder / _FILES["image"])
    return str(folder / _FILES["tokens"]), VocabLayout.from_tokenizers(text, image), text, image


def generation_params(data_cfg: DataConfig, seed: int) -> dict[str, Any]:
    """Everything the generated files depend on, after checking it is consistent."""
    check_demo_corpus(data_cfg)
    size, patch = data_cfg.synthetic_image_size, data_cfg.synthetic_patch_size
    return {"format": FORMAT, "seed": seed, "samples": data_cfg.synthetic_samples,
            "image_size": size, "patch_size": patch,
            "image_vocab_size": data_cfg.image_vocab_size,
            "text_vocab_size": data_cfg.text_vocab_size, "kmeans_iters": KMEANS_ITERS}


def _complete(folder: Path, params: dict[str, Any]) -> bool:
    try:
        if json.loads((folder / _FILES["params"]).read_text()) != params:
            return False
    except (OSError, ValueError):  # missing or half-written by hand: not ours to trust
        return False
    needed = [folder / _FILES["text"], folder / _FILES["image"],
              *paths(folder / _FILES["tokens"]).values()]
    return all(p.is_file() for p in needed)


def _generate_into(folder: Path, params: dict[str, Any]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-tmp-", dir=folder.parent))
    try:
        _generate(tmp, params)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            publish_folder(tmp, folder, replace=False)
        except OSError:
            if not _complete(folder, params):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _generate(out: Path, params: dict[str, Any]) -> None:
    stage = _Stages()
    corpus = synthetic.generate(params["samples"], params["image_size"], params["seed"])
    stage(f"drew {params['samples']} synthetic {params['image_size']}px images")
    text = SentencePieceTokenizer.train(corpus.captions, params["text_vocab_size"],
                                        out / Path(_FILES["text"]).stem)
    stage(f"trained a {text.vocab_size}-id sentencepiece BPE model")
    image = KMeansPatchVQ.fit(corpus.images, params["image_vocab_size"], params["patch_size"],
                              params["seed"], params["kmeans_iters"])
    image.save(out / _FILES["image"])
    codes = image.encode(corpus.images)
    stage(f"fitted a {image.codebook_size}-code k-means patch VQ and encoded the images")
    layout = VocabLayout.from_tokenizers(text, image)
    captions = [text.encode(c) for c in corpus.captions]
    write_indexed(out / _FILES["tokens"],
                  (make_document(c, k, layout) for c, k in zip(captions, codes)), layout,
                  meta={**_meta(text, image, params, max(map(len, captions))),
                        "caption_token_counts": _length_counts(captions)})
    stage(f"wrote {len(captions)} documents (captions of up to {max(map(len, captions))} "
          f"tokens)")
    (out / _FILES["params"]).write_text(json.dumps(params, indent=2) + "\n")


def _meta(text: SentencePieceTokenizer, image: KMeansPatchVQ, params: dict[str, Any],
          max_caption_tokens: int) -> dict[str, Any]:
    return {"mode": "conditional",
            "text_tokenizer": {"kind": "sentencepiece", "file": _FILES["text"],
                               "identity": text.identity()},
            "image_tokenizer": {"kind": "kmeans_patch_vq", "file": _FILES["image"],
                                "identity": image.identity(),
                                "tokens_per_image": image.tokens_per_image},
            "generation": params, "max_caption_tokens": max_caption_tokens}


def _length_counts(captions: list[list[int]]) -> dict[str, int]:
    """{"<tokens>": captions of that length}: the trainer counts those over its budget."""
    counts = Counter(map(len, captions))
    return {str(n): counts[n] for n in sorted(counts)}


class _Stages:
    """Prints one progress line per stage, with the seconds it took."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        print(f"demo corpus: {what} ({now - self.t:.1f}s)", flush=True)
        self.t = now

