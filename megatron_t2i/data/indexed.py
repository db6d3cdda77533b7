"""Token files: megatron-core's indexed format plus a vocabulary sidecar.

    <prefix>.bin         int32 tokens, one document per sequence
    <prefix>.idx         megatron-core's index (lengths, byte offsets, document boundaries)
    <prefix>.vocab.json  {"layout": VocabLayout.to_dict(), "mode": ..., "id_range": [min, max],
                          ...meta (tokenizer identities)}

A prefix may instead name a shard set (`<prefix>.shards.json` and one such pair per shard,
data/shards.py), opened by the same `open_indexed` and read as one sequence of documents.

Reading goes through megatron-core's own `IndexedDataset`; `open_indexed` first checks what it
would otherwise trip over with an assertion or a crash deep in numpy: missing files, a layout
that differs from the training config, a .bin that does not match its .idx, a sidecar without
a `mode` (text files would be read as caption-image samples) or whose recorded id range does
not fit the layout (ids past the embedding crash the first forward pass; ids in the padding
rows train silently).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
)

from megatron_t2i.data.shards import ShardedIndexed, check_shards, read_manifest
from megatron_t2i.data.token_arrays import (  # re-exported: one import for the callers
    DataFileError,
    check_token_arrays,
    manifest_path,
    paths,
)
from megatron_t2i.vocab import VocabLayout

MODES = ("conditional", "unconditional", "text")  # what preprocessing writes (see preprocess.py)


def write_indexed(prefix: str | Path, sequences: Iterable[Sequence[int] | np.ndarray],
                  layout: VocabLayout, meta: dict[str, Any] | None = None) -> None:
    """Write one document per sequence as int32, and the sidecar (with counts added)."""
    p = paths(prefix)
    p["bin"].parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(p["bin"]), dtype=np.int32)
    documents = tokens = 0
    lo, hi, images = layout.size, -1, False
    for seq in sequences:
        arr = np.asarray(seq, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= layout.size):
            raise ValueError(f"{prefix}: document {documents} has token ids outside the "
                             f"layout's [0, {layout.size})")
        builder.add_document(arr.astype(np.int32), [arr.size])
        documents, tokens = documents + 1, tokens + arr.size
        if arr.size:
            lo, hi = min(lo, int(arr.min())), max(hi, int(arr.max()))
            images = images or bool((arr == layout.boi_id).any())
    builder.finalize(str(p["idx"]))
    # without a stated mode, documents holding no <boi> are text (packed GPT-style)
    meta = {"mode": "conditional" if images else "text", **(meta or {})}
    write_sidecar(prefix, layout, meta, documents, tokens, (lo, hi) if hi >= 0 else None)


def merge_indexed(prefix: str | Path, shard_prefixes: Sequence[str | Path],
                  layout: VocabLayout, meta: dict[str, Any] | None = None,
                  id_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """Concatenate shard files (written in parallel) into one, in the order given, through
    megatron-core's `IndexedDatasetBuilder.add_index`; returns (documents, tokens).
    `id_range`: the smallest and largest token id of all shards, for the sidecar."""
    p = paths(prefix)
    p["bin"].parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(p["bin"]), dtype=np.int32)
    # add_index runs a full gc.collect() per shard: ~0.8 s each over torch's heap, unless the
    # objects alive now are frozen out of the collector's sight first
    gc.freeze()
    try:
        for shard in shard_prefixes:
            builder.add_index(str(shard))
    finally:
        gc.unfreeze()
    builder.finalize(str(p["idx"]))
    documents = len(builder.document_indices) - 1
    tokens = int(np.sum(builder.sequence_lengths, dtype=np.int64))
    write_sidecar(prefix, layout, meta, documents, tokens, id_range)
    return documents, tokens


def write_sidecar(prefix: str | Path, layout: VocabLayout, meta: dict[str, Any] | None,
                  documents: int, tokens: int, id_range: tuple[int, int] | None = None) -> None:
    """Written last: a sidecar next to a .bin/.idx means the pair is complete. `meta` must
    say the `mode`; `id_range` is the (min, max) token id (None: no tokens)."""
    if (meta or {}).get("mode") not in MODES:
        raise ValueError(f"{prefix}: a token file's sidecar needs a mode, one of {MODES}")
    sidecar = {"layout": layout.to_dict(), **(meta or {}),
               "num_documents": documents, "num_tokens": tokens,
               "id_range": list(id_range) if id_range is not None else None}
    paths(prefix)["vocab.json"].write_text(json.dumps(sidecar, indent=2) + "\n")


def read_sidecar(prefix: str | Path) -> dict[str, Any]:
    path = paths(prefix)["vocab.json"]
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary sidecar {path} not found: token files need one "
                                f"(written by write_indexed next to the .bin/.idx)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON: {e}") from None


def open_indexed(prefix: str | Path, expected_layout: VocabLayout,
                 mine: str = "the training config") -> IndexedDataset | ShardedIndexed:
    """Open token files after checking they exist, agree with each other and with the layout.
    `prefix` names one `.bin/.idx` pair or a shard set (`<prefix>.shards.json`, data/shards.py),
    read as one sequence of documents."""
    for path in token_files(prefix):
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} not found (data prefix {prefix})")
    p = paths(prefix)
    sidecar = read_sidecar(prefix)
    if "layout" not in sidecar:
        raise DataFileError(f"{p['vocab.json']}: no 'layout' entry")
    expected_layout.check_matches(VocabLayout.from_dict(sidecar["layout"]),
                                  mine=mine, theirs=str(p["vocab.json"]))
    check_mode_and_range(p["vocab.json"], sidecar, expected_layout)
    if _names_shard_set(prefix):
        entries = read_manifest(prefix)
        check_shards(prefix, entries, sidecar)
        return ShardedIndexed(prefix, entries)
    check_token_arrays(prefix)
    return IndexedDataset(str(prefix), mmap=True)


def token_files(prefix: str | Path) -> list[Path]:
    """The files a data prefix needs: its .bin/.idx, or a shard set's manifest (the shards
    it lists are checked on opening); and the sidecar."""
    p = paths(prefix)
    if _names_shard_set(prefix):
        return [manifest_path(prefix), p["vocab.json"]]
    return list(p.values())


def _names_shard_set(prefix: str | Path) -> bool:
    """A shard manifest and no .bin: a prefix holding both is refused, since either could
    be the stale one (a merge that stopped before removing the shards, or the reverse)."""
    manifest, bin_ = manifest_path(prefix), paths(prefix)["bin"]
    if manifest.is_file() and bin_.is_file():
        raise DataFileError(f"{prefix}: both {bin_} and {manifest} exist; remove the stale "
                            f"one (a data prefix names one token file or one shard set)")
    return manifest.is_file()


def allowed_ids(mode: str, layout: VocabLayout) -> tuple[int, int]:
    """[lo, hi) of the ids a file of this mode may hold: text ids only in text files; text,
    image codes and the added specials (never the padding rows) in image files."""
    return (0, layout.text_size) if mode == "text" else (0, layout.size)


def check_mode_and_range(path: Path, sidecar: dict[str, Any], layout: VocabLayout) -> None:
    """The sidecar says how to read the file (`mode`) and which ids it holds (`id_range`),
    and those ids fit the layout. Refuses hand-written sidecars that leave either out."""
    mode = sidecar.get("mode")
    if mode not in MODES:
        raise DataFileError(f"{path}: 'mode' is {mode!r}, expected one of {list(MODES)}; "
                            f"a sidecar must say whether the file holds text or images "
                            f"(tools/import_token_files.py writes one for text files)")
    if "id_range" not in sidecar:
        raise DataFileError(f"{path}: no 'id_range' (the smallest and largest token id); "
                            f"regenerate the files, or for a text file run "
                            f"tools/import_token_files.py")
    if sidecar["id_range"] is None:  # a file without tokens
        return
    lo, hi = sidecar["id_range"]
    allowed = allowed_ids(mode, layout)
    if lo < allowed[0] or hi >= allowed[1]:
        raise DataFileError(f"{path}: token ids {lo}..{hi} do not fit {mode} files of this "
                            f"layout, which hold ids in [{allowed[0]}, {allowed[1]})")


