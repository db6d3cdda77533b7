"""Tokenizers by name: what preprocessing, benchmarks and sidecars refer to.

    load_text_tokenizer("sentencepiece", "sp.model")
    load_text_tokenizer("hf", "openlm/tokenizer.json", vocab_size=50432)
    load_image_tokenizer("kmeans", "vq.npz")
    load_image_tokenizer("movqgan", "movqgan_270M.ckpt")   # MoVQGAN.from_checkpoint(path)
    load_image_tokenizer("vqvae", "vq.safetensors")        # VQVAETokenizer (+ vq.json)

A (kind, path) pair is all a worker process needs to rebuild the same tokenizer, and it is
what the token files' sidecar records next to the tokenizer's identity hash. Image tokenizers
that need torch models (MoVQGAN) are imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_t2i.tokenizers.image import ImageTokenizer
from megatron_t2i.tokenizers.text import TextTokenizer

TEXT_KINDS = ("sentencepiece", "hf")
# kind -> (module, class, classmethod that loads one from a path)
_IMAGE_CLASSES = {"kmeans": ("megatron_t2i.tokenizers.kmeans", "KMeansPatchVQ", "load"),
                  "movqgan": ("megatron_t2i.tokenizers.movqgan", "MoVQGAN", "from_checkpoint"),
                  "vqvae": ("megatron_t2i.tokenizers.vqvae", "VQVAETokenizer", "load")}
IMAGE_KINDS = tuple(_IMAGE_CLASSES)


def text_kind_of(path: str | Path) -> str:
    """'hf' for a tokenizer.json (or a folder with one), else 'sentencepiece'."""
    path = Path(path)
    return "hf" if path.suffix == ".json" or (path / "tokenizer.json").is_file() \
        else "sentencepiece"


def load_text_tokenizer(kind: str, path: str | Path, **options: Any) -> TextTokenizer:
    """kind: 'sentencepiece' (a .model), 'hf' (a tokenizer.json) or 'auto' (by file name).
    options go to HFTokenizer (vocab_size, bos_token, eos_token, pad_token)."""
    if kind == "auto":
        kind = text_kind_of(path)
    if kind == "sentencepiece":
        if options:
            raise ValueError(f"sentencepiece tokenizer {path}: options {sorted(options)} apply "
                             f"only to Hugging Face tokenizers")
        from megatron_t2i.tokenizers.text import SentencePieceTokenizer

        return SentencePieceTokenizer.load(path)
    if kind == "hf":
        from megatron_t2i.tokenizers.hf import HFTokenizer

        return HFTokenizer.load(path, **options)
    raise ValueError(f"unknown text tokenizer kind {kind!r}; expected one of "
                     f"{list(TEXT_KINDS) + ['auto']}")


def load_image_tokenizer(kind: str, path: str | Path, **options: Any) -> ImageTokenizer:
    """kind: 'kmeans' (a KMeansPatchVQ .npz), 'movqgan' (a MoVQGAN checkpoint) or 'vqvae'
    (a VQVAETokenizer .safetensors with its .json config beside it). options go to the
    loader (MoVQGAN: batch_size, device)."""
    return image_tokenizer_loader(kind)(path, **options)


def image_tokenizer_loader(kind: str) -> Callable[[str | Path], ImageTokenizer]:
    if kind not in _IMAGE_CLASSES:
        raise ValueError(f"unknown image tokenizer kind {kind!r}; expected one of "
                         f"{list(IMAGE_KINDS)}")
    module, cls, loader = _IMAGE_CLASSES[kind]
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"image tokenizer {kind!r} needs {module}.{cls}: {e}") from e
    return getattr(found, loader)


def describe(kind: str, path: str | Path, tokenizer: TextTokenizer | ImageTokenizer
             ) -> dict[str, Any]:
    """What a sidecar records about a tokenizer: enough to reload it and to compare it."""
    out: dict[str, Any] = {"kind": kind, "path": str(path), "identity": tokenizer.identity()}
    if isinstance(tokenizer, TextTokenizer):
        out["vocab_size"] = tokenizer.vocab_size
    else:
        out.update(codebook_size=tokenizer.codebook_size, image_size=tokenizer.image_size,
                   tokens_per_image=tokenizer.tokens_per_image)
    return out
