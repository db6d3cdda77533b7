"""Reading and writing trainer checkpoints one tensor at a time, without a process group.

A trainer checkpoint (training/checkpointing.py) is a megatron-core dist_checkpointing folder
in the torch_dist format: PyTorch Distributed Checkpoint (DCP) files holding *global* tensors
(the word-embedding table is [padded vocab, hidden] whatever the TP size it was saved at;
layer tensors carry a leading layer axis; model/keys.py names them), a `common.pt` with the non-tensor state,
a `metadata.json` naming the backend, and our `meta.json`.

A global tensor is stored as *chunks* (DCP's word): the pieces the ranks wrote. The trainer
writes each layer of a layer-stacked tensor as its own chunk (split again by TP), so the 1.1 GB
`linear_fc1.weight` of a 1B model is 96 pieces of 11 MB at TP=2. The tools here never need
the whole model in memory, nor even a whole tensor: `CheckpointReader.read` loads a tensor or
one chunk of it, and `write_checkpoint` plans a DCP save from shapes alone and asks for each
chunk only when DCP is about to write it; layer-stacked tensors are written one layer per
chunk (`layer_chunks`), as the trainer does, so a later tool can stream them too. A tool's output appears whole or
not at all through checkpoint/layout.py's `staged_output`.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_t2i.checkpoint.integrity import write_manifest
from megatron_t2i.checkpoint.layout import (
    META_FILE,
    CheckpointError,
    read_meta,
    reason,
    resolve_folder,
    write_meta,
)
from megatron_t2i.checkpoint.trust import (
    DCP_METADATA_FILE,
    check_before_load,
    checked_object_bytes,
    load_object,
    read_safe_metadata,
)
from megatron_t2i.files import sync_folder

COMMON_FILE = "common.pt"
# megatron-core 0.17+ saves the common (non-tensor) state as this sharded object inside the DCP
# files instead of common.pt (and still loads common.pt); its bytes hold `[common_state]`.
COMMON_OBJECT = "common_state/shard_0_1"
BACKEND_FILE = "metadata.json"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}



class Chunk(NamedTuple):
    """One stored piece of a global tensor: where it starts and how big it is."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def index(self) -> tuple[slice, ...]:
        """The slices that cut this chunk out of the global tensor."""
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.sizes))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n


def whole(shape: tuple[int, ...]) -> Chunk:
    """The chunk that is the entire tensor."""
    return Chunk((0,) * len(shape), tuple(shape))


@dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know about a tensor before it exists: its global shape and
    dtype, and the chunks it is written as (None: the whole tensor as one chunk)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...] | None = None

    @property
    def nbytes(self) -> int:
        return whole(self.shape).numel * torch.empty((), dtype=self.dtype).element_size()


def layer_chunks(shape: tuple[int, ...]) -> tuple[Chunk, ...]:
    """One chunk per layer of a layer-stacked tensor: the trainer's own layout, so a later
    tool can read it a layer at a time."""
    rest = tuple(shape[1:])
    return tuple(Chunk((i,) + (0,) * len(rest), (1,) + rest) for i in range(shape[0]))


class CheckpointReader:
    """One trainer checkpoint, checked to be complete, read a tensor at a time."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.folder = resolve_folder(path)
        for name in (META_FILE, BACKEND_FILE, DCP_METADATA_FILE):
            if not (self.folder / name).is_file():
                raise CheckpointError(
                    f"{self.folder} is not a complete trainer checkpoint: {name} is missing")
        self.meta: dict[str, Any] = read_meta(self.folder)
        backend = json.loads((self.folder / BACKEND_FILE).read_text())
        if backend.get("sharded_backend") != "torch_dist":
            raise CheckpointError(f"{self.folder / BACKEND_FILE}: sharded backend "
                                      f"{backend.get('sharded_backend')!r}, expected torch_dist")
        # sizes and checksums, then every pickle: nothing in the folder runs code, and what
        # read_object_bytes hands on to be copied has been validated
        check_before_load(self.folder, verify)
        self._metadata = read_safe_metadata(self.folder)
        self._storage = FileSystemReader(str(self.folder))
        self._storage.set_up_storage_reader(self._metadata, is_coordinator=True)
        if not (self.folder / COMMON_FILE).is_file() and COMMON_OBJECT not in self.object_keys():
            raise CheckpointError(f"{self.folder} is not a complete trainer checkpoint: "
                                  f"{COMMON_FILE} is missing")

    # ---- what is there ---------------------------------------------------------------------
    def tensor_keys(self) -> list[str]:
        return [k for k, v in self._metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)]

    def object_keys(self) -> list[str]:
        return [k for k, v in self._metadata.state_dict_metadata.items()
                if isinstance(v, BytesStorageMetadata)]

    def spec(self, key: str) -> TensorSpec:
        """Shape, dtype and the stored chunks: a rewrite with these chunks reads and writes
        each piece exactly once."""
        md = self._metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.folder}: no tensor {key!r} in the checkpoint")
        return TensorSpec(tuple(md.size), md.properties.dtype, tuple(self.chunks(key)))

    def chunks(self, key: str) -> list[Chunk]:
        """The pieces the ranks wrote: the sharding (and layer split) it was saved with."""
        md = self._metadata.state_dict_metadata[key]
        return [Chunk(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]

    def common(self) -> dict[str, Any]:
        try:
            if (self.folder / COMMON_FILE).is_file():
                return load_object(self.folder / COMMON_FILE, self.folder / COMMON_FILE)
            where = f"{self.folder} (object {COMMON_OBJECT!r})"
            return load_object(self.read_object_bytes(COMMON_OBJECT), where)[0]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.folder / COMMON_FILE}: cannot be read "
                                      f"({reason(e)})") from None

    # ---- reading ---------------------------------------------------------------------------
    def read(self, key: str, chunk: Chunk | None = None) -> torch.Tensor:
        """The global tensor, or the part of it `chunk` names. Memory: the result plus one
        stored chunk at a time (DCP loads a stored chunk whole, then copies it in); a stored
        chunk asked for as it is comes back without the copy."""
        spec = self.spec(key)
        chunk = chunk or whole(spec.shape)
        if len(chunk.offsets) != len(spec.shape) or any(
                o < 0 or n < 0 or o + n > s for o, n, s in zip(*chunk, spec.shape)):
            raise CheckpointError(f"{self.folder}: {key} is {spec.shape}; cannot read the "
                                      f"region at {chunk.offsets} of size {chunk.sizes}")
        if chunk in spec.chunks:
            stored = self._load_stored_chunk(key, chunk)
            if stored is not None:
                return stored
        out = torch.empty(chunk.sizes, dtype=spec.dtype)
        wanted = ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes))
        items = create_read_items_for_chunk_list(key, self._metadata.state_dict_metadata[key],
                                                 [wanted])
        found = sum(whole(tuple(item.lengths)).numel for item in items)
        if found != chunk.numel:
            raise CheckpointError(f"{self.folder}: the stored chunks of {key} cover {found} "
                                      f"of the {chunk.numel} elements asked for")
        self._read(items, _ReadInto(out))
        return out

    def read_object_bytes(self, key: str) -> bytes:
        """The serialized bytes of a sharded object (RNG state, layer extra state), unparsed."""
        if not isinstance(self._metadata.state_dict_metadata.get(key), BytesStorageMetadata):
            raise CheckpointError(f"{self.folder}: no object {key!r} in the checkpoint")
        index = MetadataIndex(key)
        into = _ReadInto()
        self._read([ReadItem(type=LoadItemType.BYTE_IO, dest_index=index,
                             dest_offsets=torch.Size([0]), storage_index=index,
                             storage_offsets=torch.Size([0]), lengths=torch.Size([0]))], into)
        # validated again as read: a tool copies these bytes into its output verbatim
        return checked_object_bytes(into.raw[key], f"{self.folder} (object {key!r})")

    def _load_stored_chunk(self, key: str, chunk: Chunk) -> torch.Tensor | None:
        """A stored chunk asked for whole is the tensor torch.load returns from its bytes:
        DCP's reader would load it the same way and then copy it into a fresh tensor, which
        doubles the memory traffic of a copying tool. None when the bytes are transformed
        (compressed, ...): the general path handles that."""
        info = self._metadata.storage_data.get(MetadataIndex(key, torch.Size(chunk.offsets)))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        with open(self.folder / info.relative_path, "rb") as f:
            tensor = torch.load(_FileWindow(f, info.offset, info.length), map_location="cpu",
                                weights_only=True)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != chunk.sizes:
            raise CheckpointError(f"{self.folder / info.relative_path}: the chunk of {key} "
                                      f"at {chunk.offsets} does not hold a {chunk.sizes} tensor")
        return tensor

    def _read(self, items: list[ReadItem], into: _ReadInto) -> None:
        """Run read items through the storage reader directly: dcp.load would re-read the
        metadata and re-plan the whole state dict for every chunk."""
        plan = self._storage.prepare_local_plan(LoadPlan(items))
        plan = self._storage.prepare_global_plan([plan])[0]
        self._storage.read_data(plan, into).wait()


class _FileWindow(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, seen as a file of their own."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + pos, 0), self._length)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer).cast("B")[:n])
        self._pos += got
        return got


class _ReadInto:
    """The part of DCP's LoadPlanner a storage reader calls: where each read item lands."""

    def __init__(self, out: torch.Tensor | None = None) -> None:
        self.out = out
        self.raw: dict[str, bytes] = {}

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.out[Chunk(tuple(item.dest_offsets), tuple(item.lengths)).index()]

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item: ReadItem, value: io.BytesIO) -> None:
        self.raw[item.dest_index.fqn] = value.read()


def object_bytes(value: Any) -> bytes:
    """A sharded object as megatron-core stores it: torch.save of a one-element list."""
    buf = io.BytesIO()
    torch.save([value], buf)
    return buf.getvalue()


# ---- writing -----------------------------------------------------------------------------

Entry = TensorSpec | bytes
Producer = Callable[[str], torch.Tensor]  # key -> the whole tensor
ChunkProducer = Callable[[str, Chunk], torch.Tensor]  # key, chunk -> that part of it


@dataclass
class WriteStats:
    tensors: int = 0
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.tensors} tensors + {self.objects} objects, "
                f"{self.bytes / 2**20:,.1f} MiB written in {self.seconds:.1f} s")


def _write_items(entries: dict[str, Entry]) -> list[WriteItem]:
    """One DCP write item per chunk of each tensor, one per object; in `entries`' order."""
    items = []
    for key, entry in entries.items():
        if not isinstance(entry, TensorSpec):
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
            continue
        size, properties = torch.Size(entry.shape), TensorProperties(dtype=entry.dtype)
        for chunk in entry.chunks or (whole(entry.shape),):
            offsets = torch.Size(chunk.offsets)
            items.append(WriteItem(
                index=MetadataIndex(key, offsets), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(ChunkStorageMetadata(offsets,
                                                                 torch.Size(chunk.sizes)),
                                            properties, size)))
    return items


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from shapes alone; produces each chunk only when DCP writes it.

    With a whole-tensor `produce`, the tensor is held only while its chunks are written.
    """

    def __init__(self, entries: dict[str, Entry], produce: Producer | None,
                 produce_chunk: ChunkProducer | None, progress: Callable[[int], None]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._entries = entries
        self._produce = produce
        self._produce_chunk = produce_chunk
        self._progress = progress
        self._held: tuple[str, torch.Tensor, int] | None = None  # key, tensor, chunks left

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(_write_items(self._entries))
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        key = write_item.index.fqn
        entry = self._entries[key]
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(entry)
        md = write_item.tensor_data.chunk
        chunk = Chunk(tuple(md.offsets), tuple(md.sizes))
        if self._produce_chunk is not None:
            tensor = self._produce_chunk(key, chunk)
        else:
            tensor = self._from_whole(key, entry, chunk)
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != entry.dtype:
            raise RuntimeError(f"{key}: produced {tuple(tensor.shape)} {tensor.dtype} for the "
                               f"chunk at {chunk.offsets}, planned {chunk.sizes} {entry.dtype}")
        self._progress(tensor.nbytes)
        return tensor.contiguous()

    def _from_whole(self, key: str, entry: TensorSpec, chunk: Chunk) -> torch.Tensor:
        if self._held is None or self._held[0] != key:
            self._held = None  # free the previous tensor before producing the next
            tensor = self._produce(key)
            if tuple(tensor.shape) != entry.shape:
                raise RuntimeError(f"{key}: produced {tuple(tensor.shape)}, planned "
                                   f"{entry.shape}")
            self._held = (key, tensor, len(entry.chunks or (whole(entry.shape),)))
        key, tensor, left = self._held
        self._held = (key, tensor, left - 1) if left > 1 else None
        return tensor[chunk.index()]


def write_checkpoint(folder: Path, entries: dict[str, Entry], produce: Producer | None,
                     common: dict[str, Any], meta: dict[str, Any], desc: str = "writing",
                     produce_chunk: ChunkProducer | None = None) -> WriteStats:
    """Write a complete iteration folder. `entries` maps each key to its spec (tensors) or
    serialized bytes (sharded objects). Each tensor is written as its spec's chunks (else
    whole); `produce_chunk(key, chunk)` returns one chunk when DCP writes it, or,
    without it, `produce(key)` returns the whole tensor when its first chunk is written.

    One file per write item: DCP's writer keeps every tensor of a file alive until the file
    is closed, so a single file per rank would hold the whole model in memory. The files are
    synced once at the end (an fsync per file would wait for each one's writeback in turn).
    """
    from tqdm import tqdm

    if (produce is None) == (produce_chunk is None):
        raise TypeError("write_checkpoint needs exactly one of produce, produce_chunk")
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    planned: dict[str, Any] = {}
    for key, entry in entries.items():
        planned[key] = (torch.empty(entry.shape, dtype=entry.dtype, device="meta")
                        if isinstance(entry, TensorSpec) else io.BytesIO(entry))
    stats = WriteStats(tensors=sum(isinstance(e, TensorSpec) for e in entries.values()))
    stats.objects = len(entries) - stats.tensors
    total = sum(e.nbytes for e in entries.values() if isinstance(e, TensorSpec))
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False,
              disable=None) as bar:
        planner = _LazySavePlanner(entries, produce, produce_chunk, bar.update)
        writer = FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=1,
                                  sync_files=False)
        dcp.save(planned, storage_writer=writer, planner=planner, no_dist=True)
    torch.save(common, folder / COMMON_FILE)
    (folder / BACKEND_FILE).write_text(json.dumps(BACKEND))
    write_meta(folder, meta)
    write_manifest(folder)
    sync_folder(folder)
    stats.bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    stats.seconds = time.perf_counter() - start
    return stats
