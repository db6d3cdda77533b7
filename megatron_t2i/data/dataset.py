"""Fixed-length training samples from token files: one document per sample.

Documents and samples follow the one schema of data/documents.py (`[bos] caption [boi] image
codes [eoi]`, image-only with an empty caption, text-only `[bos] text [eod]`; samples of
seq_length + 1 tokens as tokens/labels/loss_mask/modality).

Image documents are never packed together: a sample is one picture and its caption, which
keeps the image at a known offset and makes per-modality losses exact. Text-only token files
(preprocessed in `text` mode) are packed GPT-style instead by `PackedTextDataset`.

Sample ids may run past the dataset's length: id `epoch * len + i` is item i in that epoch
(the sampler counts that way), so what varies per epoch, caption dropout, is a pure function
of the id and a resumed run sees exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megatron_t2i.config import split_weights
from megatron_t2i.data.documents import Sample, drop_caption, fit_document, make_sample
from megatron_t2i.data.indexed import DataFileError
from megatron_t2i.vocab import VocabLayout


class T2IDataset(torch.utils.data.Dataset):
    """Item i is document `document_ids[i]` of an IndexedDataset, as one padded sample.

    Returns tokens, labels, loss_mask and modality of length seq_length (data/documents.py).
    """

    def __init__(self, indexed: torch.utils.data.Dataset, layout: VocabLayout,
                 seq_length: int, document_ids: Sequence[int] | np.ndarray,
                 loss_on_captions: bool = True, caption_dropout: float = 0.0,
                 seed: int = 0) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout} is outside [0, 1)")
        self.indexed = indexed
        self.layout = layout
        self.seq_length = seq_length
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        self.loss_on_captions = loss_on_captions
        self.caption_dropout = caption_dropout
        self.seed = seed
        self._dropped_epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.document_ids)

    def __getitem__(self, i: int) -> Sample:
        epoch, i = divmod(int(i), len(self.document_ids))
        doc = np.asarray(self.indexed[int(self.document_ids[i])], dtype=np.int64)
        if problem := document_problem(doc, self.layout):
            raise DataFileError(f"{_name(self.indexed)}: document {self.document_ids[i]} "
                                f"{problem}")
        if self.caption_dropout and self.dropped(epoch)[i]:
            doc = drop_caption(doc, self.layout)
        doc, boi = fit_document(doc, self.layout, self.seq_length + 1)
        return make_sample(doc, boi, self.layout.pad_id, self.seq_length,
                           self.loss_on_captions)

    def dropped(self, epoch: int) -> np.ndarray:
        """Which items lose their caption in `epoch` (for classifier-free guidance): one
        draw per item from the seed and the epoch, cached for the current epoch."""
        if self._dropped_epoch is None or self._dropped_epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0xD50])
            self._dropped_epoch = (epoch, rng.random(len(self.document_ids))
                                   < self.caption_dropout)
        return self._dropped_epoch[1]


class PackedTextDataset(torch.utils.data.Dataset):
    """Text-only documents (`[bos] text [eod]`) concatenated in a seeded order and cut into
    samples of seq_length + 1 tokens, consecutive samples sharing one token (GPT-style).
    Every target is a text target: loss mask 1, modality 0."""

    def __init__(self, indexed, layout: VocabLayout, seq_length: int,
                 document_ids: Sequence[int] | np.ndarray, seed: int = 0) -> None:
        self.indexed = indexed
        self.layout = layout
        self.seq_length = seq_length
        order = np.random.default_rng([seed, 0x7E47]).permutation(
            np.asarray(document_ids, dtype=np.int64))
        self.documents = order
        lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)[order]
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each doc
        self.num_samples = max(int(self.starts[-1]) - 1, 0) // seq_length

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Sample:
        start = (int(i) % self.num_samples) * self.seq_length
        window = self._stream(start, self.seq_length + 1)  # full: no padding, all text
        if window.min() < 0 or window.max() >= self.layout.text_size:  # one min/max a sample
            self._refuse(start, window)
        return make_sample(window, None, self.layout.pad_id, self.seq_length)

    def _refuse(self, start: int, sample: np.ndarray) -> None:
        bad = int(np.flatnonzero((sample < 0) | (sample >= self.layout.text_size))[0])
        d = int(np.searchsorted(self.starts, start + bad, side="right")) - 1
        raise DataFileError(f"{_name(self.indexed)}: document {self.documents[d]} holds id "
                            f"{sample[bad]}, outside the text range [0, "
                            f"{self.layout.text_size}) of a text file")

    def _stream(self, start: int, length: int) -> np.ndarray:
        d = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, need = [], length
        while need:
            offset = start - int(self.starts[d]) if not pieces else 0
            take = min(need, int(self.starts[d + 1] - self.starts[d]) - offset)
            pieces.append(self.indexed.get(int(self.documents[d]), offset, take))
            need, d = need - take, d + 1
        return np.concatenate(pieces).astype(np.int64)


def document_problem(doc: np.ndarray, layout: VocabLayout) -> str | None:
    """What is wrong with a stored document's ids for its modality, or None: the caption
    (up to `<boi>`) holds text ids only, the image part image codes only, and the document
    ends with `<eoi>`; a document without `<boi>` holds text ids only. A min and a max per
    part: microseconds per sample, against a step's milliseconds (docs/data-hygiene.md)."""
    hits = np.flatnonzero(doc == layout.boi_id)
    boi = int(hits[0]) if len(hits) else len(doc)
    parts = [("text", doc[:boi], 0, layout.text_size)]
    if len(hits):
        if doc[-1] != layout.eoi_id:
            return f"does not end with <eoi> ({layout.eoi_id}) but with {doc[-1]}"
        parts.append(("image", doc[boi + 1:-1], layout.image_start, layout.specials_start))
    for what, part, lo, hi in parts:
        if part.size and (part.min() < lo or part.max() >= hi):
            value = part[(part < lo) | (part >= hi)][0]
            return (f"holds id {value} in its {what} part, outside the {what} range "
                    f"[{lo}, {hi})")
    return None


def _name(indexed) -> str:
    """The token-file prefix of megatron-core's IndexedDataset, for messages."""
    return str(getattr(indexed, "path_prefix", type(indexed).__name__))


def split_documents(num_docs: int, split: str = "90,5,5",
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint, covering train/valid/test document ids from weights like "90,5,5".

    Documents are shuffled with `seed` before cutting, so each split sees every kind of
    document; ids inside a split are sorted (the sampler does the per-epoch shuffling).
    """
    weights = np.asarray(split_weights(split))
    bounds = np.rint(np.cumsum(weights) / weights.sum() * num_docs).astype(np.int64)
    order = np.random.default_rng(seed).permutation(num_docs)
    train, valid, test = np.split(order, bounds[:2])
    return np.sort(train), np.sort(valid), np.sort(test)
