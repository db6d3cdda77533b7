"""A shard set: many megatron-core token files read as one, with no merge.

Preprocessing (without `--merge`) leaves one indexed file per task and a manifest:

    <prefix>.shards/NNNNNN.bin / .idx   one megatron-core indexed file per task (int32)
    <prefix>.shards.json                {"format": "megatron_t2i.token_shards", "version": 1,
                                         "shards": [{"prefix": "<prefix name>.shards/000000",
                                                     "documents": int, "tokens": int}, ...]}
    <prefix>.vocab.json                 the sidecar, as for a single file (written last)

Shard prefixes are relative to the manifest's folder (POSIX). Document i of the set is
document i of the shards concatenated in manifest order, so a shard set and the file
`merge_indexed` would make of it give the same samples. Each shard is opened with
megatron-core's `IndexedDataset` (mmap) after the same checks as a single file, plus the
manifest's counts against the shard's .idx; docs/data-at-scale.md says why there is no merge.
"""

from __future__ import annotations

import bisect
import itertools
import json
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_t2i.data.token_arrays import (
    DataFileError,
    check_token_arrays,
    index_counts,
    manifest_path,
    paths,
)
from megatron_t2i.files import write_text_atomic

FORMAT, VERSION = "megatron_t2i.token_shards", 1
_FDS_PER_SHARD = 3  # megatron-core keeps the .bin open plus one mmap each of .bin and .idx


@dataclass(frozen=True)
class ShardEntry:
    prefix: Path  # resolved against the manifest's folder
    documents: int
    tokens: int


def read_manifest(prefix: str | Path) -> list[ShardEntry]:
    """The manifest's shards, in order; a malformed manifest fails naming the file and key."""
    path = manifest_path(prefix)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataFileError(f"{path}: 'format' is not {FORMAT!r}; not a token shard manifest")
    if manifest.get("version") != VERSION:
        raise DataFileError(f"{path}: 'version' is {manifest.get('version')!r}; this reader "
                            f"knows version {VERSION}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataFileError(f"{path}: 'shards' must be a non-empty list")
    return [_entry(path, i, s) for i, s in enumerate(shards)]


def _entry(path: Path, i: int, shard: object) -> ShardEntry:
    where = f"{path}: shards[{i}]"
    if not isinstance(shard, dict):
        raise DataFileError(f"{where} is not an object")
    rel = shard.get("prefix")
    # relative and inside the manifest's folder: a manifest cannot point training elsewhere
    if not isinstance(rel, str) or not rel or PurePosixPath(rel).is_absolute() \
            or ".." in PurePosixPath(rel).parts:
        raise DataFileError(f"{where}.prefix is {rel!r}; expected a relative POSIX path "
                            f"below the manifest's folder")
    for key in ("documents", "tokens"):
        value = shard.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataFileError(f"{where}.{key} is {value!r}; expected a count >= 0")
    return ShardEntry(path.parent / PurePosixPath(rel), shard["documents"], shard["tokens"])


def write_manifest(prefix: str | Path, shard_prefixes: Sequence[str | Path]) -> list[ShardEntry]:
    """Write `<prefix>.shards.json` for finished shards (in task order), counts taken from
    their .idx files; atomically, so a reader sees the old manifest or the whole new one."""
    folder = manifest_path(prefix).parent
    entries = []
    for shard in shard_prefixes:
        documents, tokens = index_counts(paths(shard)["idx"])
        entries.append(ShardEntry(Path(shard), documents, tokens))
    shards = [{"prefix": Path(e.prefix).resolve().relative_to(folder.resolve()).as_posix(),
               "documents": e.documents, "tokens": e.tokens} for e in entries]
    write_text_atomic(manifest_path(prefix), json.dumps(
        {"format": FORMAT, "version": VERSION, "shards": shards}, indent=1) + "\n")
    return entries


def check_shards(prefix: str | Path, entries: Sequence[ShardEntry],
                 sidecar: dict | None = None) -> None:
    """Every shard exists, is whole (.bin size and .idx arrays, as for a single file) and
    holds what the manifest says; the totals agree with the sidecar's, when it has them."""
    where = manifest_path(prefix)
    for i, e in enumerate(entries):
        for path in paths(e.prefix)["bin"], paths(e.prefix)["idx"]:
            if not path.is_file():
                raise FileNotFoundError(f"token shard {path} not found (shards[{i}] of {where})")
        check_token_arrays(e.prefix)
        documents, tokens = index_counts(paths(e.prefix)["idx"])
        if (documents, tokens) != (e.documents, e.tokens):
            raise DataFileError(f"{paths(e.prefix)['idx']}: holds {documents} documents and "
                                f"{tokens} tokens but {where} lists shards[{i}] with "
                                f"{e.documents} and {e.tokens}; the shard or the manifest "
                                f"is stale: rerun preprocessing")
    for key, total in (("num_documents", sum(e.documents for e in entries)),
                       ("num_tokens", sum(e.tokens for e in entries))):
        if sidecar and sidecar.get(key) is not None and sidecar[key] != total:
            raise DataFileError(f"{prefix}.vocab.json: {key} is {sidecar[key]} but the shards "
                                f"of {where} hold {total}; rerun preprocessing")


class ShardedIndexed:
    """The documents of several megatron-core `IndexedDataset`s as one sequence, with the
    reading interface the datasets use (`len`, `[i]`, `get`, `sequence_lengths`)."""

    def __init__(self, prefix: str | Path, entries: Sequence[ShardEntry]) -> None:
        self.path_prefix = str(prefix)  # named in the datasets' error messages
        _raise_open_file_limit(len(entries), manifest_path(prefix))
        # a task whose records were all skipped leaves an empty shard, which cannot be mapped
        self.shards = [IndexedDataset(str(e.prefix), mmap=True) for e in entries if e.documents]
        # document i lives in shard s where starts[s] <= i < starts[s + 1]; a list, since
        # bisect on it is a few times faster than numpy's searchsorted on one scalar
        self.starts = [0, *itertools.accumulate(len(s) for s in self.shards)]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, document within the shard) of document i of the set."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path_prefix}: document {i} outside the set's {len(self)}")
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def __getitem__(self, i: int) -> np.ndarray:
        s, j = self.locate(int(i))
        return self.shards[s][j]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        s, j = self.locate(int(i))
        return self.shards[s].get(j, offset, length)

    @cached_property
    def sequence_lengths(self) -> np.ndarray:
        # built once, only by the packed-text dataset: 4 bytes a document
        return np.concatenate([s.sequence_lengths for s in self.shards])


def _raise_open_file_limit(shards: int, where: Path) -> None:
    """Each open shard holds a few file descriptors; many shards need more than the usual
    soft limit of 1,024, so raise it up to the hard limit, or say plainly what is missing."""
    need = shards * _FDS_PER_SHARD + 256  # headroom for the rest of the process
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise DataFileError(f"{where}: {shards} shards need about {need} open files, above "
                                f"this process's hard limit of {hard} (ulimit -n); raise it, or "
                                f"merge the shards (tools/preprocess_data.py --merge)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
