"""Reading and writing trainer checkpoints one tensor at a time, without a process group.

A trainer checkpoint (training/checkpointing.py) is a megatron-core dist_checkpointing folder
in the torch_dist format: PyTorch Distributed Checkpoint (DCP) files holding *global* tensors
(`embedding.word_embeddings.weight` is [padded vocab, hidden] whatever the TP size it was
saved at; layer tensors carry a leading layer axis), a `common.pt` with the non-tensor state,
a `metadata.json` naming the backend, and our `meta.json`.

The tools here never need the whole model in memory: `CheckpointReader.read` loads one tensor
through DCP, and `write_checkpoint` plans a DCP save from shapes alone and asks for each
tensor only when DCP is about to write it, so a rewrite streams tensor by tensor.
`staged_output` makes a tool's output appear whole or not at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

META_FILE = "meta.json"
COMMON_FILE = "common.pt"
DCP_METADATA_FILE = ".metadata"
BACKEND_FILE = "metadata.json"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


class CheckpointToolError(ValueError):
    """Input a checkpoint tool cannot use; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorSpec:
    """What the planner needs to know about a tensor before it exists."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def iteration_folder(path: str | Path) -> Path:
    """The `iter_NNNNNNN` folder a path names: itself, or the one its `latest` points to."""
    path = Path(path)
    if not path.exists():
        raise CheckpointToolError(f"{path}: no such checkpoint folder")
    if (path / META_FILE).exists() or path.name.startswith("iter_"):
        return path
    latest = path / "latest"
    if latest.exists():
        text = latest.read_text().strip()
        if not text.isdigit():
            raise CheckpointToolError(f"{latest}: expected an iteration number, found {text!r}")
        return path / f"iter_{int(text):07d}"
    raise CheckpointToolError(f"{path} is not a checkpoint: it has neither {META_FILE} (an "
                              f"iter_NNNNNNN folder) nor a `latest` file (a checkpoint root)")


class CheckpointReader:
    """One trainer checkpoint, checked to be complete, read a tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.folder = iteration_folder(path)
        for name in (META_FILE, BACKEND_FILE, DCP_METADATA_FILE, COMMON_FILE):
            if not (self.folder / name).is_file():
                raise CheckpointToolError(
                    f"{self.folder} is not a complete trainer checkpoint: {name} is missing")
        try:
            self.meta: dict[str, Any] = json.loads((self.folder / META_FILE).read_text())
        except ValueError as e:
            raise CheckpointToolError(f"{self.folder / META_FILE}: not valid JSON ({e})") from None
        backend = json.loads((self.folder / BACKEND_FILE).read_text())
        if backend.get("sharded_backend") != "torch_dist":
            raise CheckpointToolError(f"{self.folder / BACKEND_FILE}: sharded backend "
                                      f"{backend.get('sharded_backend')!r}, expected torch_dist")
        try:
            self._metadata = FileSystemReader(str(self.folder)).read_metadata()
        except Exception as e:  # a truncated or foreign .metadata file
            raise CheckpointToolError(
                f"{self.folder / DCP_METADATA_FILE}: not a readable DCP metadata file ({e})"
            ) from None
        self._check_shards()

    def _check_shards(self) -> None:
        """Every data file the metadata points into must exist and be long enough."""
        needed: dict[str, int] = {}
        for info in self._metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                             info.offset + info.length)
        for name, size in sorted(needed.items()):
            path = self.folder / name
            if not path.is_file():
                raise CheckpointToolError(f"{self.folder}: shard file {name} is missing "
                                          f"(listed in {DCP_METADATA_FILE})")
            if path.stat().st_size < size:
                raise CheckpointToolError(f"{path}: truncated ({path.stat().st_size} bytes, "
                                          f"the metadata needs {size})")

    # ---- what is there ---------------------------------------------------------------------
    def tensor_keys(self) -> list[str]:
        return [k for k, v in self._metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)]

    def object_keys(self) -> list[str]:
        return [k for k, v in self._metadata.state_dict_metadata.items()
                if isinstance(v, BytesStorageMetadata)]

    def spec(self, key: str) -> TensorSpec:
        md = self._metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointToolError(f"{self.folder}: no tensor {key!r} in the checkpoint")
        return TensorSpec(tuple(md.size), md.properties.dtype)

    def chunks(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of the pieces the ranks wrote: the sharding it was saved with."""
        md = self._metadata.state_dict_metadata[key]
        return [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]

    def common(self) -> dict[str, Any]:
        try:
            return torch.load(self.folder / COMMON_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointToolError(f"{self.folder / COMMON_FILE}: cannot be read ({e})"
                                      ) from None

    # ---- reading ---------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        spec = self.spec(key)
        out = {key: torch.empty(spec.shape, dtype=spec.dtype)}
        dcp.load(out, storage_reader=FileSystemReader(str(self.folder)), no_dist=True)
        return out[key]

    def read_object_bytes(self, key: str) -> bytes:
        """The serialized bytes of a sharded object (RNG state, layer extra state), unparsed."""
        if not isinstance(self._metadata.state_dict_metadata.get(key), BytesStorageMetadata):
            raise CheckpointToolError(f"{self.folder}: no object {key!r} in the checkpoint")
        planner = _RawBytesLoadPlanner()
        dcp.load({key: io.BytesIO()}, storage_reader=FileSystemReader(str(self.folder)),
                 planner=planner, no_dist=True)
        return planner.raw[key]


class _RawBytesLoadPlanner(DefaultLoadPlanner):
    """Keeps sharded objects as the bytes on disk instead of unpickling them."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()


def object_bytes(value: Any) -> bytes:
    """A sharded object as megatron-core stores it: torch.save of a one-element list."""
    buf = io.BytesIO()
    torch.save([value], buf)
    return buf.getvalue()


# ---- writing -----------------------------------------------------------------------------

Entry = TensorSpec | bytes
Producer = Callable[[str], torch.Tensor]


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


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from shapes (meta tensors); produces each tensor only when DCP writes it."""

    def __init__(self, entries: dict[str, Entry], produce: Producer,
                 progress: Callable[[int], None]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._entries = entries
        self._produce = produce
        self._progress = progress

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        key = write_item.index.fqn
        entry = self._entries[key]
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(entry)
        tensor = self._produce(key)
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(f"{key}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{entry.shape} {entry.dtype}")
        self._progress(entry.nbytes)
        return tensor.contiguous()


def write_checkpoint(folder: Path, entries: dict[str, Entry], produce: Producer,
                     common: dict[str, Any], meta: dict[str, Any], desc: str = "writing"
                     ) -> WriteStats:
    """Write a complete iteration folder. `entries` maps each key to its spec (tensors) or
    serialized bytes (sharded objects); `produce(key)` returns a tensor when it is written."""
    from tqdm import tqdm

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
        planner = _LazySavePlanner(entries, produce, bar.update)
        dcp.save(planned, storage_writer=FileSystemWriter(str(folder), thread_count=1),
                 planner=planner, no_dist=True)
    torch.save(common, folder / COMMON_FILE)
    (folder / BACKEND_FILE).write_text(json.dumps(BACKEND))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    stats.bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    stats.seconds = time.perf_counter() - start
    return stats


@contextlib.contextmanager
def staged_output(target: str | Path, overwrite: bool = False,
                  sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it into place once the body succeeds.

    A killed or failing tool leaves `target` as it was (a leftover `.<name>.tmp-*` folder at
    most). An existing target is refused unless `overwrite`; a target that is (or holds) one
    of the `sources` is always refused, so a source is never modified.
    """
    target = Path(target).absolute()
    for src in sources:
        src = Path(src).absolute()
        if target == src or target in src.parents or src in target.parents:
            raise CheckpointToolError(f"output {target} overlaps the source {src}; "
                                      f"write to another folder")
    if target.exists() and not overwrite:
        raise CheckpointToolError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_latest(root: Path, iteration: int) -> None:
    (root / "latest").write_text(f"{iteration}\n")
