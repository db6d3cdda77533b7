"""Checkpoints from anywhere load without running code: one reader for every pickle we open.

A trainer checkpoint holds pickles that its own libraries open unsafely: torch DCP reads the
`.metadata` file with `pickle.load`, and reads each sharded object (megatron-core's
`_extra_state`, the RNG states) with `torch.load(weights_only=False)`; DeepSpeed opens its
`*_model_states.pt` and `*_optim_states.pt` with `weights_only=False` too. A crafted pickle in
any of them runs code the moment the checkpoint is loaded.

`check_before_load(folder)` is the one gate every load path calls first (resume, pretrained
init, evaluation and generation, the checkpoint tools, DeepSpeed resume). It first checks that
the files are whole (the checkpoint's manifest of sizes and checksums, `integrity.py`; for a
checkpoint saved before manifests, the shard sizes its DCP metadata needs), then reads every
pickle of the folder the safe way, before any library touches it:

- each DCP `.metadata` through `read_dcp_metadata`, an unpickler that builds only the DCP
  metadata classes, torch sizes, dtypes and layouts, and plain containers and scalars;
- each sharded object stored in the DCP data files, `common.pt` and every other `*.pt` file
  (megatron-core object files, DeepSpeed's model and optimizer states) with
  `torch.load(weights_only=True)`, which admits tensors, plain data and the few classes
  registered as safe (megatron-core's own list; DeepSpeed's few, for its files only).

Unpickling only ever calls a global the pickle names, so bytes that these readers accept
load the same, and run nothing, when the libraries' own unrestricted loaders read them next.
Anything else is refused with one line naming the file and the class (`UntrustedCheckpoint`).
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from megatron_t2i.checkpoint.io import check_files
from megatron_t2i.checkpoint.layout import CheckpointError

# What a DCP `.metadata` is made of (torch 2.6-2.13 and megatron-core's torch_dist writer):
# dataclasses rebuilt field by field, and enums looked up by value. No callable here can
# reach the file system, the interpreter or the import machinery.
_DCP_CLASSES: tuple[type, ...] = (
    dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta,
    dcp_metadata.TensorProperties, dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata,
    dcp_metadata._MEM_FORMAT_ENCODING, dcp_filesystem._StorageInfo,
    dcp_planner.SavePlan, dcp_planner.WriteItem, dcp_planner.WriteItemType,
    dcp_planner.TensorWriteData,
)
_PLAIN: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # "torch.strided"
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id of a no_dist save
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
}
METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{(c.__module__, c.__qualname__): c for c in _DCP_CLASSES}, **_PLAIN,
    **{("torch", str(d).removeprefix("torch.")): d for d in vars(torch).values()
       if isinstance(d, torch.dtype)},
}
DEEPSPEED_SUFFIXES = ("_model_states.pt", "_optim_states.pt")


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its optimizer states beside tensors and plain data:
    the loss scaler (rebuilt by setting its attributes; it defines no `__setstate__`), the
    ZeRO stage enum and the partition addresses (a dataclass of two ints). Found by loading
    its checkpoints with weights_only=True; its model states need none."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # without DeepSpeed there is no DeepSpeed checkpoint to resume
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UntrustedCheckpoint(CheckpointError):
    """A checkpoint file would import a class or call a function outside the allowlist: it
    may run code, so it is not loaded (the trainer re-raises it as its CheckpointError)."""


class _MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `METADATA_GLOBALS`; the rest is refused."""

    def __init__(self, file: BinaryIO, where: Path) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        found = METADATA_GLOBALS.get((module, name))
        if found is None:
            raise UntrustedCheckpoint(
                f"{self._where}: refused: it would load {module}.{name}, which is not part of "
                f"a DCP checkpoint's metadata (a crafted file can run code this way)")
        # an allowlisted class: plain data, but an enum or a dataclass may reject bad fields
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UntrustedCheckpoint(f"{self._where}: refused: a persistent id, which DCP "
                                  f"metadata never holds")


def read_dcp_metadata(path: Path) -> Metadata:
    """A DCP `.metadata` file, unpickled through the allowlist (what `FileSystemReader.
    read_metadata` returns, without its unrestricted `pickle.load`)."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UntrustedCheckpoint:
        raise
    except Exception as e:  # truncated, or a pickle of the wrong thing
        raise CheckpointError(f"{path}: not a readable DCP metadata file "
                                  f"({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpoint(f"{path}: holds a {type(metadata).__name__}, not DCP "
                                  f"metadata")
    return metadata


def load_object(source: Path | bytes, where: str | Path, deepspeed: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a file or serialized bytes (with DeepSpeed's few
    classes admitted for its files); a refused global becomes one line naming `where` and
    the class. Files are memory-mapped: validating a large one does not read its tensors."""
    mmap = isinstance(source, Path) and zipfile.is_zipfile(source)
    stream: Any = str(source) if isinstance(source, Path) else io.BytesIO(source)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals() if deepspeed else []):
            return torch.load(stream, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else str(e).strip().splitlines()[-1]
        raise UntrustedCheckpoint(
            f"{where}: refused: it would load {what}, which is not a tensor, plain data or an "
            f"allowlisted class (a crafted file can run code this way)") from None
    except Exception as e:
        raise CheckpointError(f"{where}: cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None


def check_before_load(folder: str | Path, verify: bool = True, dcp: bool = True) -> None:
    """The files whole, then every pickle in a checkpoint folder validated (see the module
    doc); call it before any library loads the folder. `verify=False` skips only the hashing;
    `dcp=False` for a DeepSpeed folder (no DCP metadata to size shards against when it has no
    manifest). Raises UntrustedCheckpoint, or CheckpointError for a file that is damaged
    or not readable at all."""
    folder = Path(folder)
    check_files(folder, verify, dcp)
    for path in sorted(folder.glob("*.metadata")):  # DCP's `.metadata` (and per-rank ones)
        check_dcp_objects(folder, read_dcp_metadata(path))
    for path in sorted(folder.rglob("*.pt")):
        load_object(path, path, deepspeed=path.name.endswith(DEEPSPEED_SUFFIXES))


def check_dcp_objects(folder: Path, metadata: Metadata) -> None:
    """Every sharded object of a DCP checkpoint (megatron-core's `_extra_state`, RNG states)
    read from the data files as DCP would and loaded with weights_only=True."""
    for key, raw in read_dcp_object_bytes(folder, metadata).items():
        info = metadata.storage_data.get(MetadataIndex(key))
        where = f"{folder / info.relative_path if info else folder} (object {key!r})"
        load_object(raw, where)


def read_dcp_object_bytes(folder: Path, metadata: Metadata,
                          keys: list[str] | None = None) -> dict[str, bytes]:
    """The stored bytes of sharded objects (all by default), unparsed, through DCP's own
    storage reader (so compressed or otherwise transformed items come back as DCP sees them)."""
    keys = keys if keys is not None else [
        k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if not keys:
        return {}
    reader = FileSystemReader(str(folder))
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    items = []
    for key in keys:
        index = MetadataIndex(key)
        items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index,
                              dest_offsets=torch.Size([0]), storage_index=index,
                              storage_offsets=torch.Size([0]), lengths=torch.Size([0])))
    plan = reader.prepare_global_plan([reader.prepare_local_plan(LoadPlan(items))])[0]
    into = _RawBytes()
    try:
        reader.read_data(plan, into).wait()
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: a sharded object cannot be read from the data "
                                  f"files ({type(e).__name__}: {e})") from None
    return into.raw


class _RawBytes:
    """The part of DCP's LoadPlanner that `read_data` calls for objects: keep their bytes."""

    def __init__(self) -> None:
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, item: ReadItem, value: io.BytesIO) -> None:
        self.raw[item.dest_index.fqn] = value.read()


def checked_object_bytes(raw: bytes, where: str) -> bytes:
    """`raw` itself once it loads with weights_only=True: what a tool may copy verbatim."""
    load_object(raw, where)
    return raw
