"""Checksums of a checkpoint's files: written with every save, verified before every load.

A checkpoint folder (an `iter_NNNNNNN/` the trainer wrote, or the output of import, surgery
and export) holds `manifest.json`:

    {"format": "megatron_t2i-manifest", "version": 1, "hash": "xxh3-128",
     "files": {"__0_0.distcp": {"size": 123, "hash": "..."}, ".metadata": {...}, ...}}

one entry per file under the folder (by relative path) besides the manifest itself. A load
compares each file's size (always: a stat per file) and its XXH3-128 digest (the whole file
read once; XXH3 hashes several GB/s per core, so the disk bounds it; `verify=False` skips the
hashing for very large checkpoints on trusted storage), so a shard truncated, zeroed or
flipped in place is refused naming the file. A folder without a manifest (written before
manifests existed) is loaded with a warning; io.check_files (part of
trust.check_before_load) then checks its shards against the sizes the DCP metadata needs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import xxhash

from megatron_t2i.files import write_text_atomic

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "megatron_t2i-manifest"
HASH_NAME = "xxh3-128"
_BLOCK = 8 << 20  # bytes hashed per read
# Set by a user who loads a huge checkpoint from a trusted disk and wants to skip hashing.
SKIP_ENV = "MEGATRON_T2I_SKIP_CHECKSUMS"


class ChecksumError(ValueError):
    """A checkpoint file that differs from what its save recorded; the message names it."""


def file_hash(path: Path) -> str:
    """XXH3-128 of a file's bytes: a non-cryptographic hash, about ten times faster than
    BLAKE2b or SHA-256 here. It finds corruption (a flipped bit, a zeroed page); it is no
    defence against a deliberate forgery, which could rewrite the manifest too."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file under `folder` (subfolders too: DeepSpeed's; the manifest excluded).
    Call it once all files are written and before the folder is published (renamed)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != MANIFEST_FILE:
            files[name] = {"size": path.stat().st_size, "hash": file_hash(path)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "hash": HASH_NAME, "files": files}
    out = folder / MANIFEST_FILE
    write_text_atomic(out, json.dumps(manifest, indent=1) + "\n")
    return out


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest's file table, or None when the folder has none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        if manifest.get("hash") != HASH_NAME:
            raise ValueError(f"unknown hash {manifest.get('hash')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ChecksumError(f"{path}: not a valid checkpoint manifest ({e})") from None
    return files


def verify_checkpoint(folder: str | Path, verify: bool = True) -> bool:
    """Refuse (ChecksumError naming the file) a checkpoint folder whose files differ from its
    manifest: missing, another size, or (unless `verify` is False or MEGATRON_T2I_SKIP_CHECKSUMS
    is set) another hash. Returns False, after a warning on stderr, for a folder without a
    manifest (an older checkpoint): the caller loads it as before."""
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        print(f"warning: {folder} has no {MANIFEST_FILE} (written before checksums were "
              f"recorded): its files cannot be verified", file=sys.stderr, flush=True)
        return False
    hashing = verify and not os.environ.get(SKIP_ENV)
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (listed in {folder / MANIFEST_FILE})")
        size = path.stat().st_size
        if size != want["size"]:
            raise ChecksumError(f"{path}: {size} bytes, the save recorded {want['size']} "
                                f"(truncated or overwritten)")
        if hashing and file_hash(path) != want["hash"]:
            raise ChecksumError(f"{path}: contents differ from the checksum recorded at save "
                                f"time (the file is corrupted)")
    return True
