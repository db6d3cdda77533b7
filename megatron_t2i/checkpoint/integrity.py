"""Checksums of a checkpoint's files: written with every save, verified before every load.

A checkpoint folder (an `iter_NNNNNNN/` the trainer wrote, or the output of import, surgery
and export) holds `manifest.json`:

    {"format": "megatron_t2i-manifest", "version": 1, "hash": "blake2b-128",
     "files": {"__0_0.distcp": {"size": 123, "hash": "..."}, ".metadata": {...}, ...}}

one entry per file under the folder (by relative path) besides the manifest itself. A load compares each file's
size (always: a stat per file) and its BLAKE2b digest (the whole file read once, at disk
speed; `verify=False` skips the hashing for very large checkpoints), so a shard truncated,
zeroed or flipped in place is refused naming the file. A folder without a manifest (written
before manifests existed) is loaded with a warning; its shards are still checked against the
sizes the DCP metadata needs, where the caller does that check (io.CheckpointReader).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "megatron_t2i-manifest"
HASH_NAME = "blake2b-128"
_BLOCK = 8 << 20  # bytes hashed per read
# Set by a user who loads a huge checkpoint from a trusted disk and wants to skip hashing.
SKIP_ENV = "MEGATRON_T2I_SKIP_CHECKSUMS"


class ChecksumError(ValueError):
    """A checkpoint file that differs from what its save recorded; the message names it."""


def file_hash(path: Path) -> str:
    """BLAKE2b (128-bit digest) of a file's bytes: hashlib's, no extra dependency, and
    faster than SHA-256 on CPUs without SHA instructions."""
    h = hashlib.blake2b(digest_size=16)
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
    tmp = folder / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
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
