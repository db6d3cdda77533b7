"""Token files: megatron-core's indexed format plus a vocabulary sidecar.

    <prefix>.bin         int32 tokens, one document per sequence
    <prefix>.idx         megatron-core's index (lengths, byte offsets, document boundaries)
    <prefix>.vocab.json  {"layout": VocabLayout.to_dict(), "mode": ..., "id_range": [min, max],
                          ...meta (tokenizer identities)}

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
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)

from megatron_t2i.vocab import VocabLayout

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's .idx header
MODES = ("conditional", "unconditional", "text")  # what preprocessing writes (see preprocess.py)


class DataFileError(ValueError):
    """A token file (.bin / .idx / sidecar) that is corrupt or inconsistent; names the file."""


_IDX_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents


def paths(prefix: str | Path) -> dict[str, Path]:
    return {ext: Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "vocab.json")}


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
                 mine: str = "the training config") -> IndexedDataset:
    """Open token files after checking they exist, agree with each other and with the layout."""
    p = paths(prefix)
    for path in p.values():
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} not found (data prefix {prefix})")
    sidecar = read_sidecar(prefix)
    if "layout" not in sidecar:
        raise DataFileError(f"{p['vocab.json']}: no 'layout' entry")
    expected_layout.check_matches(VocabLayout.from_dict(sidecar["layout"]),
                                  mine=mine, theirs=str(p["vocab.json"]))
    check_mode_and_range(p["vocab.json"], sidecar, expected_layout)
    _check_bin_size(p["idx"], p["bin"])
    _check_index_arrays(p["idx"], p["bin"])
    return IndexedDataset(str(prefix), mmap=True)


def check_token_arrays(prefix: str | Path) -> None:
    """The .idx is well formed and the .bin holds exactly the tokens it describes."""
    p = paths(prefix)
    _check_bin_size(p["idx"], p["bin"])
    _check_index_arrays(p["idx"], p["bin"])


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


def _check_bin_size(idx: Path, bin_: Path) -> None:
    """The .bin must hold exactly the tokens the .idx counts (a cut copy fails here)."""
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEAD.size)
        if len(head) < _IDX_HEAD.size:
            raise DataFileError(f"{idx}: truncated index header; regenerate the token files")
        magic, version, code, sequences, documents = _IDX_HEAD.unpack(head)
        if magic != _IDX_MAGIC or version != 1 or code not in {d.value for d in DType}:
            raise DataFileError(f"{idx}: not a megatron-core index file (bad header: magic "
                             f"{magic!r}, version {version}, dtype code {code})")
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    # lengths (int32), pointers (int64) per sequence, then document indices (int64)
    needed = _IDX_HEAD.size + sequences * 12 + documents * 8
    if len(lengths) < sequences or idx.stat().st_size < needed:
        raise DataFileError(f"{idx}: truncated: it announces {sequences} sequences and "
                         f"{documents - 1} documents ({needed} bytes) but holds "
                         f"{idx.stat().st_size} bytes; regenerate the token files")
    expected = int(lengths.astype(np.int64).sum()) * DType.size(code)
    actual = bin_.stat().st_size
    if actual != expected:
        raise DataFileError(f"{bin_}: {actual} bytes, but {idx} describes {expected} bytes of "
                         f"tokens; the file is truncated or belongs to another index; "
                         f"regenerate the token files")


def _check_index_arrays(idx: Path, bin_: Path) -> None:
    """Pointers and document indices that megatron-core would follow out of the .bin (a bare
    `ValueError: offset ...` mid-training) or into a wrong document: checked vectorised, once,
    when the dataset is opened."""
    with open(idx, "rb") as f:
        _, _, code, sequences, documents = _IDX_HEAD.unpack(f.read(_IDX_HEAD.size))
    index = np.memmap(idx, mode="r", offset=_IDX_HEAD.size)
    lengths = index[:sequences * 4].view(np.int32).astype(np.int64)
    pointers = index[sequences * 4:sequences * 12].view(np.int64)
    doc_idx = index[sequences * 12:sequences * 12 + documents * 8].view(np.int64)
    problem = _index_problem(lengths, pointers, doc_idx, DType.size(code), bin_.stat().st_size)
    if problem:
        raise DataFileError(f"{idx}: {problem}; the index is corrupt: regenerate the token "
                            f"files")


def _index_problem(lengths: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray,
                   token_bytes: int, bin_bytes: int) -> str | None:
    """What is inconsistent in the index arrays, or None."""
    if (bad := np.flatnonzero(lengths < 0)).size:
        return f"sequence {bad[0]} has a negative length {lengths[bad[0]]}"
    if (bad := np.flatnonzero(np.diff(pointers) < 0)).size:
        return (f"sequence pointers are not increasing (sequence {bad[0] + 1} starts at byte "
                f"{pointers[bad[0] + 1]}, before sequence {bad[0]} at {pointers[bad[0]]})")
    ends = pointers + lengths * token_bytes
    if (bad := np.flatnonzero((pointers < 0) | (ends > bin_bytes))).size:
        return (f"sequence {bad[0]} spans bytes {pointers[bad[0]]}-{ends[bad[0]]}, outside "
                f"the {bin_bytes}-byte .bin")
    if doc_idx.size == 0 or doc_idx[0] != 0 or doc_idx[-1] != lengths.size:
        first_last = f"{doc_idx[0]}..{doc_idx[-1]}" if doc_idx.size else "none"
        return (f"document indices must run from 0 to the {lengths.size} sequences, "
                f"found {first_last}")
    if (bad := np.flatnonzero(np.diff(doc_idx) < 0)).size:
        return (f"document indices are not increasing (document {bad[0] + 1} starts at "
                f"sequence {doc_idx[bad[0] + 1]}, before document {bad[0]} at "
                f"{doc_idx[bad[0]]})")
    return None
