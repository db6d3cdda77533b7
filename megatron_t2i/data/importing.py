"""Adopt token files written elsewhere (Megatron-LM's `tools/preprocess_data.py`): write the
vocabulary sidecar of an existing text `.bin/.idx` after checking every id it holds.

Megatron-LM writes megatron-core's indexed format with uint16 tokens when the tokenizer has
fewer than 65,500 ids and int32 above; megatron-core's `IndexedDataset` reads both, so the
files are used as they are: only `<prefix>.vocab.json` is new. It records `mode: "text"`
(the documents are packed GPT-style, see dataset.PackedTextDataset), the text tokenizer's
identity (blending refuses files written with another one) and the id range found.

`add_id_range` does the same pass for token files written by this code before sidecars
recorded an id range, so they need not be regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_t2i.data.indexed import (
    MODES,
    DataFileError,
    allowed_ids,
    check_token_arrays,
    paths,
    read_sidecar,
    write_sidecar,
)
from megatron_t2i.tokenizers import factory
from megatron_t2i.vocab import VocabLayout

CHUNK = 1 << 24  # tokens per step of the pass over the .bin (64 MiB of int32)


def import_text_tokens(prefix: str | Path, text_tokenizer: str, image_vocab_size: int,
                       kind: str = "auto", text_vocab_size: int | None = None,
                       overwrite: bool = False) -> dict[str, Any]:
    """Check `<prefix>.bin/.idx` against the text tokenizer's range and write the sidecar;
    returns it. Raises DataFileError naming the file and the first document with an id
    outside [0, text vocabulary size)."""
    p = paths(prefix)
    for ext in ("bin", "idx"):
        if not p[ext].is_file():
            raise FileNotFoundError(f"token file {p[ext]} not found")
    if p["vocab.json"].exists() and not overwrite:
        raise FileExistsError(f"{p['vocab.json']} exists; pass --overwrite to replace it")
    check_token_arrays(prefix)
    options = {"vocab_size": text_vocab_size} if text_vocab_size else {}
    kind = factory.text_kind_of(text_tokenizer) if kind == "auto" else kind
    text = factory.load_text_tokenizer(kind, text_tokenizer, **options)
    layout = VocabLayout.from_tokenizers(text, image_size=image_vocab_size)
    indexed = IndexedDataset(str(prefix), mmap=True)
    found = id_range(indexed, layout.text_size, str(p["bin"]))
    meta = {"mode": "text", "text_tokenizer": factory.describe(kind, text_tokenizer, text),
            "image_tokenizer": None,
            "imported": {"dtype": np.dtype(indexed.index.dtype).name,
                         "documents": len(indexed.document_indices) - 1}}
    tokens = int(np.sum(indexed.sequence_lengths, dtype=np.int64))
    write_sidecar(prefix, layout, meta, len(indexed), tokens, found)
    return read_sidecar(prefix)


def add_id_range(prefix: str | Path) -> dict[str, Any]:
    """Record `id_range` in an existing sidecar that has a layout and a mode but no range,
    after checking every id against what the mode allows; returns the new sidecar."""
    p = paths(prefix)
    side = read_sidecar(prefix)
    if "layout" not in side or side.get("mode") not in MODES:
        raise DataFileError(f"{p['vocab.json']}: needs a 'layout' and a 'mode' (one of "
                            f"{list(MODES)}) to add an id range; for a text file without a "
                            f"sidecar use --text-tokenizer")
    check_token_arrays(prefix)
    layout = VocabLayout.from_dict(side["layout"])
    _, limit = allowed_ids(side["mode"], layout)  # both ranges start at 0
    found = id_range(IndexedDataset(str(prefix), mmap=True), limit, str(p["bin"]),
                     what=f"{side['mode']} files' range")
    side["id_range"] = list(found) if found else None
    p["vocab.json"].write_text(json.dumps(side, indent=2) + "\n")
    return side


def id_range(indexed: IndexedDataset, text_size: int, name: str,
             what: str = "text tokenizer's range") -> tuple[int, int] | None:
    """(min, max) token id of the whole file (None if it has none) in one chunked pass over
    its memory map; raises at the first id outside [0, text_size), naming the sequence (one
    per document unless Megatron-LM split sentences), as the training checks do."""
    tokens = np.memmap(f"{indexed.path_prefix}.bin", mode="r", dtype=indexed.index.dtype)
    lo, hi = None, None
    for start in range(0, len(tokens), CHUNK):
        chunk = tokens[start:start + CHUNK]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        if c_lo < 0 or c_hi >= text_size:
            bad = start + int(np.flatnonzero((chunk < 0) | (chunk >= text_size))[0])
            raise DataFileError(f"{name}: document {_sequence_at(indexed, bad)} holds id "
                                f"{int(tokens[bad])}, outside the {what} "
                                f"[0, {text_size})")
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return None if lo is None else (lo, hi)


def _sequence_at(indexed: IndexedDataset, token: int) -> int:
    """The sequence holding the token at flat position `token` of the .bin."""
    itemsize = np.dtype(indexed.index.dtype).itemsize
    return int(np.searchsorted(indexed.index.sequence_pointers, token * itemsize, side="right")) - 1
