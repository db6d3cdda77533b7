"""The two files of one megatron-core token file, `<prefix>.bin` / `.idx`, and the checks
that catch what megatron-core would otherwise trip over with an assertion or a crash deep in
numpy (a .bin that does not match its .idx, index arrays pointing outside the .bin). Used for
single files (data/indexed.py) and for each shard of a shard set (data/shards.py).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's .idx header


class DataFileError(ValueError):
    """A token file (.bin / .idx / sidecar) that is corrupt or inconsistent; names the file."""


_IDX_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents


def paths(prefix: str | Path) -> dict[str, Path]:
    return {ext: Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "vocab.json")}


def manifest_path(prefix: str | Path) -> Path:
    """The manifest of a shard set (data/shards.py) named by `prefix`."""
    return Path(f"{prefix}.shards.json")


def index_counts(idx: Path) -> tuple[int, int]:
    """(documents, tokens) an .idx describes, from its header and sequence lengths."""
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEAD.size)
        if len(head) < _IDX_HEAD.size:
            raise DataFileError(f"{idx}: truncated index header; regenerate the token files")
        _, _, _, sequences, documents = _IDX_HEAD.unpack(head)
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    return documents - 1, int(lengths.sum(dtype=np.int64))


def check_token_arrays(prefix: str | Path) -> None:
    """The .idx is well formed and the .bin holds exactly the tokens it describes."""
    p = paths(prefix)
    _check_bin_size(p["idx"], p["bin"])
    _check_index_arrays(p["idx"], p["bin"])


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
