"""The one schema of documents and samples: what a token file stores and what a model sees.

A stored document (int ids of the vocabulary layout, vocab.py) is one of

    [bos] caption [boi] image codes [eoi]    an image with its caption (`make_document`)
    [bos] [boi] image codes [eoi]            an image alone: the caption is empty
    [bos] text [eod]                         text only (`make_text_document`)

Preprocessing (data/preprocess.py), the demo corpus (data/demo.py) and held-out text files
(eval/perplexity.py) build documents here; the datasets (data/dataset.py) and evaluation turn
them into samples here. A sample holds seq_length + 1 tokens, padded with the layout's pad id;
`tokens` is the sample without its last token and `labels` without its first, so position t
predicts labels[t]:

    tokens     int64    sample[:-1]
    labels     int64    sample[1:]
    loss_mask  float32  1 on real targets; 0 on padding targets, and 0 on caption targets
                        (caption tokens and `<boi>`) when loss_on_captions=False
    modality   int64    1 where the label is an image code or `<eoi>`, else 0.
                        `<eoi>` counts as image because predicting where the image ends is
                        part of image modelling; `<boi>` counts as text because it follows
                        the caption. Padding targets are 0 (their loss_mask is 0 anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_t2i.vocab import VocabLayout

Sample = dict[str, torch.Tensor]


def make_document(caption_ids: Sequence[int], codes: np.ndarray,
                  layout: VocabLayout) -> np.ndarray:
    """The stored form of one pair: `[bos] caption [boi] image codes [eoi]` (int64 ids)."""
    image = layout.image_token(np.asarray(codes, dtype=np.int64).reshape(-1))
    return np.concatenate([[layout.bos_id], np.asarray(caption_ids, dtype=np.int64),
                           [layout.boi_id], image, [layout.eoi_id]]).astype(np.int64)


def make_text_document(text_ids: Sequence[int], layout: VocabLayout) -> np.ndarray:
    """The stored form of a text: `[bos] text [eod]` (int64 ids)."""
    return np.asarray([layout.bos_id, *text_ids, layout.eod_id], dtype=np.int64)


def drop_caption(doc: np.ndarray, layout: VocabLayout) -> np.ndarray:
    """`[bos] caption [boi] codes [eoi]` -> `[bos] [boi] codes [eoi]` (text-only unchanged)."""
    hits = np.flatnonzero(doc == layout.boi_id)
    return np.concatenate([doc[:1], doc[hits[0]:]]) if len(hits) else doc


def fit_document(doc: np.ndarray, layout: VocabLayout,
                 length: int) -> tuple[np.ndarray, int | None]:
    """Shorten a document to at most `length` tokens by cutting the end of its caption.

    The image part (`<boi>` codes `<eoi>`) and the leading bos stay whole: a cut image would
    teach the model pictures that stop mid-way. Returns the document and the index of `<boi>`
    (None for a text-only document, which is simply cut at `length`).
    """
    hits = np.flatnonzero(doc == layout.boi_id)
    if len(hits) == 0:
        return doc[:length], None
    boi = int(hits[0])
    if len(doc) <= length:
        return doc, boi
    image_part = len(doc) - boi
    keep = length - image_part - 1  # caption tokens that fit after bos
    if keep < 0:
        raise ValueError(f"a document's image part ({image_part} tokens with <boi>/<eoi>) "
                         f"does not fit a sample of {length} tokens; raise model.seq_length")
    return np.concatenate([doc[:1 + keep], doc[boi:]]), 1 + keep


def make_sample(doc: np.ndarray, boi: int | None, pad_id: int, seq_length: int,
                loss_on_captions: bool = True) -> Sample:
    """A fitted document (or a window of running text, boi None), padded to seq_length + 1
    tokens, as tokens/labels/masks."""
    n = len(doc)
    sample = np.full(seq_length + 1, pad_id, dtype=np.int64)
    sample[:n] = doc
    target = np.arange(1, seq_length + 1)  # sample index of each label
    real = target < n
    image = real & (target > boi) if boi is not None else np.zeros_like(real)
    loss_mask = real if loss_on_captions or boi is None else image
    return {
        "tokens": torch.from_numpy(sample[:-1].copy()),
        "labels": torch.from_numpy(sample[1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "modality": torch.from_numpy(image.astype(np.int64)),
    }
