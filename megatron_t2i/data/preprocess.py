"""Image-caption corpora -> indexed token files: a shard set (`<prefix>.shards/NNNNNN.bin/.idx`
listed in `<prefix>.shards.json`) or one `<prefix>.bin/.idx`; the `.vocab.json` sidecar last.

Inputs (by file name; a folder means every such file in it, sorted):
  *.jsonl    one JSON object per line: an image path (relative to the file) and a caption
  *.tar      webdataset shards: members grouped by key (`k.jpg` + `k.txt` or `k.json`)
  *.parquet  an image column (bytes, a {bytes, path} struct, or a path) and a caption column

Modes: `conditional` writes `[bos] caption [boi] codes [eoi]`, `unconditional` writes
`[bos] [boi] codes [eoi]` (the caption is ignored), `text` writes `[bos] text [eod]` for text
corpora blended in (the dataset packs those GPT-style).

The flow: the inputs are cut into tasks (`task_bytes` of a jsonl, one tar, one parquet row
group: fixed by the files alone); task i is encoded by process i mod world size (one encoder
per GPU under torchrun / srun); in each, `workers` DataLoader processes read and decode whole
tasks (captions tokenized, images decoded, resized, cropped) and hand over chunks of
`batch_size` images, one image-tokenizer call each; each task becomes shard i, committed
atomically with a done file holding its counts. So the output does not depend on the number
of processes or workers, and a rerun resumes where a killed run stopped. A record that cannot
be used (missing or unreadable image, empty caption, bad JSON, any exception) is skipped and
counted, never fatal; the counts go to the sidecar and every skipped record to
`<prefix>.skipped.jsonl`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from megatron_t2i.data.documents import make_document, make_text_document
from megatron_t2i.data.indexed import merge_indexed, paths, write_sidecar
from megatron_t2i.data.shards import write_manifest
from megatron_t2i.data.token_arrays import manifest_path
from megatron_t2i.distributed import detect_launch_env
from megatron_t2i.files import publish_file, write_text_atomic
from megatron_t2i.tokenizers import factory
from megatron_t2i.tokenizers.image import ImageTokenizer
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.vocab import VocabLayout

Mode = Literal["conditional", "unconditional", "text"]
FORMATS = {".jsonl": "jsonl", ".tar": "tar", ".parquet": "parquet"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_LISTED_SKIPS = 100  # skipped records quoted in the sidecar (all of them go to .skipped.jsonl)
# A jsonl task's byte range (~40k records of ~200 bytes): fixed, not derived from the number of
# processes, so the tasks (and shards) are the same for any job size and a rerun finds them.
TASK_BYTES = 8 << 20
@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a worker needs to rebuild the pipeline (tokenizers by kind and path)."""
    inputs: tuple[str, ...]
    output_prefix: str
    mode: Mode = "conditional"
    text_tokenizer: tuple[str, str] = ("auto", "")
    text_tokenizer_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("vocab_size", 50432),)
    image_tokenizer: tuple[str, str] | None = None
    image_vocab_size: int | None = None  # text mode without an image tokenizer
    image_key: str = "image"
    caption_key: str = "caption"
    text_key: str = "text"
    workers: int = 1  # decode workers per encoder process
    batch_size: int = 64  # images per image-tokenizer call
    progress: bool = True
    task_bytes: int = TASK_BYTES  # jsonl bytes per task
    # one .bin/.idx (True) or a shard set: PREFIX.shards/ + PREFIX.shards.json (False; the
    # command line's default)
    merge: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
    """One slice of one input file, turned into one shard by one worker."""
    index: int
    format: str
    path: str
    start: int = 0  # jsonl: byte range of line starts; parquet: row-group range
    stop: int = 0


@dataclasses.dataclass
class Record:
    source: str  # where it came from, for the skip list: "file.jsonl@1234", "a.tar:key"
    image: bytes | Path | None = None
    caption: str | None = None
    problem: str | None = None  # set by a reader that could not parse it


@dataclasses.dataclass
class TaskResult:
    index: int
    shard: str
    records: int = 0
    documents: int = 0
    tokens: int = 0
    caption_tokens: int = 0
    max_caption_tokens: int = 0
    caption_lengths: Counter = dataclasses.field(default_factory=Counter)  # tokens -> captions
    id_range: tuple[int, int] | None = None  # smallest and largest token id written
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # src, why, msg


@dataclasses.dataclass
class Summary:
    prefix: str
    records: int
    documents: int
    tokens: int
    skipped: dict[str, int]
    seconds: float
    sidecar: dict[str, Any]
    shards: int = 0  # 0: merged into one .bin/.idx


class SkipRecord(Exception):
    """A record that cannot be used; `reason` is the counted category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---- the entry point ---------------------------------------------------------------------

def preprocess(settings: Settings) -> Summary | None:
    """Tokenize the inputs into a shard set (`<prefix>.shards/`, `<prefix>.shards.json`) or,
    with `settings.merge`, one `<prefix>.bin/.idx`; plus `<prefix>.vocab.json`, written last.

    Under torchrun / srun every process is one encoder (on the GPU of its local rank) and takes
    tasks i with i mod world size == its rank. A task's shard is committed when its done file
    is written; a rerun of the same command (the fingerprint in the shard folder must match)
    skips committed shards and redoes the rest, so the result equals an uninterrupted run.
    Returns the summary on rank 0, None on the others."""
    t0 = time.perf_counter()
    started = not torch.distributed.is_initialized()
    rank = start_ranks()
    try:
        device = encoder_device(rank)
        text, image = load_tokenizers(settings)
        layout = _layout(settings, text, image)
        tasks = plan_tasks(expand_inputs(settings.inputs), settings.task_bytes)
        shard_dir = Path(f"{settings.output_prefix}.shards")
        # rank 0 alone: MoVQGAN's identity hashes every weight
        stamp = fingerprint(settings, text, image, tasks) if rank.leader else {}
        claim_shard_dir(shard_dir, stamp, rank)
        todo = [t for t in rank.mine(tasks) if not committed(shard_dir, t.index)]
        encode_tasks(settings, todo, shard_dir, image, layout, device, rank.leader)
        barrier(rank)
        summary = None
        if rank.leader:
            results = [read_task_result(shard_dir, t.index) for t in tasks]
            summary = finish(settings, text, image, layout, results, shard_dir, t0)
        barrier(rank)
        return summary
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def finish(settings: Settings, text: TextTokenizer, image: ImageTokenizer | None,
           layout: VocabLayout, results: list[TaskResult], shard_dir: Path, t0: float
           ) -> Summary:
    """Rank 0, once every shard is committed: the skip list, then the manifest (or the merged
    file) and the sidecar last."""
    prefix = settings.output_prefix
    # an older set's sidecar would say "complete" while its files are being replaced
    paths(prefix)["vocab.json"].unlink(missing_ok=True)
    meta = _meta(settings, text, image, results)
    documents = sum(r.documents for r in results)
    tokens = sum(r.tokens for r in results)
    if not documents:
        raise ValueError(f"{prefix}: no document written from {meta['records']} records; "
                         f"skipped: {meta['skipped']}")
    _write_skip_list(prefix, results)
    ranges = [r.id_range for r in results if r.id_range is not None]
    id_range = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
    manifest = manifest_path(prefix)
    if settings.merge:
        merge_indexed(prefix, [r.shard for r in results], layout, meta, id_range)
        manifest.unlink(missing_ok=True)
        shutil.rmtree(shard_dir, ignore_errors=True)
    else:
        for ext in ("bin", "idx"):  # an older merged file would make the prefix ambiguous
            paths(prefix)[ext].unlink(missing_ok=True)
        write_manifest(prefix, [r.shard for r in results])
        write_sidecar(prefix, layout, meta, documents, tokens, id_range)
    sidecar = json.loads(paths(prefix)["vocab.json"].read_text())
    return Summary(prefix, meta["records"], documents, tokens, meta["skipped"],
                   time.perf_counter() - t0, sidecar, 0 if settings.merge else len(results))


def load_tokenizers(settings: Settings, image: bool = True
                    ) -> tuple[TextTokenizer, ImageTokenizer | None]:
    """Both tokenizers; the text one even for image-only files, since the vocabulary layout
    (its size, bos/eos) is shared with the image-caption files they are trained with.
    `image=False`: the text one only (decode workers)."""
    kind, path = settings.text_tokenizer
    if not path:
        raise ValueError("preprocessing needs a text tokenizer (it defines the vocabulary "
                         "layout, even for unconditional files)")
    text = factory.load_text_tokenizer(kind, path, **dict(settings.text_tokenizer_options))
    if settings.image_tokenizer is None:
        if settings.mode != "text":
            raise ValueError(f"mode {settings.mode!r} needs an image tokenizer")
        return text, None
    if not image:
        return text, None
    kind, path = settings.image_tokenizer
    # MoVQGAN batches its forward passes itself: one pass per chunk of --batch-size images
    options = {"batch_size": settings.batch_size} if kind == "movqgan" else {}
    return text, factory.load_image_tokenizer(kind, path, **options)


def _layout(settings: Settings, text: TextTokenizer, image: ImageTokenizer | None
            ) -> VocabLayout:
    if image is None and settings.image_vocab_size is None:
        raise ValueError("text mode without an image tokenizer needs image_vocab_size, so the "
                         "layout matches the image-caption files it is blended with")
    if image is not None:
        return VocabLayout.from_tokenizers(text, image)
    return VocabLayout.from_tokenizers(text, image_size=settings.image_vocab_size)


# ---- inputs and tasks --------------------------------------------------------------------

def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files by name; a folder stands for its .jsonl/.tar/.parquet files, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in FORMATS)
            if not found:
                raise FileNotFoundError(f"input folder {path} holds no "
                                        f"{'/'.join(FORMATS)} files")
            files.extend(found)
        elif not path.is_file():
            raise FileNotFoundError(f"input {path} not found")
        elif path.suffix not in FORMATS:
            raise ValueError(f"input {path}: unknown format; expected one of "
                             f"{list(FORMATS)}")
        else:
            files.append(path)
    return files


def plan_tasks(files: list[Path], task_bytes: int = TASK_BYTES) -> list[Task]:
    """Cut each file into tasks: `task_bytes` of a jsonl, one tar, one parquet row group. The
    cut depends on the files alone, never on the number of processes: task i is shard i."""
    tasks: list[Task] = []
    for path in files:
        fmt = FORMATS[path.suffix]
        if fmt == "jsonl":
            size = path.stat().st_size
            step = max(1, task_bytes)
            spans = [(s, min(s + step, size)) for s in range(0, size, step)] or [(0, 0)]
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(path).metadata.num_row_groups
            spans = [(g, g + 1) for g in range(groups)]
        else:
            spans = [(0, 0)]
        tasks += [Task(len(tasks) + i, fmt, str(path), a, b) for i, (a, b) in enumerate(spans)]
    return tasks


def estimate_records(tasks: list[Task]) -> int | None:
    """For the progress bar: lines of jsonl files, rows of parquet files (None with tars)."""
    total = 0
    for task in tasks:
        if task.format == "tar":
            return None
        if task.format == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(task.path).metadata
            total += sum(meta.row_group(g).num_rows for g in range(task.start, task.stop))
        else:
            with open(task.path, "rb") as f:
                f.seek(task.start)
                total += f.read(task.stop - task.start).count(b"\n")
    return total


# ---- readers -----------------------------------------------------------------------------

def read_records(task: Task, settings: Settings) -> Iterator[Record]:
    reader = {"jsonl": _read_jsonl, "tar": _read_tar, "parquet": _read_parquet}[task.format]
    return reader(task, settings)


def _text_field(settings: Settings) -> str:
    return settings.text_key if settings.mode == "text" else settings.caption_key


def _read_jsonl(task: Task, settings: Settings) -> Iterator[Record]:
    """Lines that start inside [start, stop) of the file."""
    root = Path(task.path).parent
    with open(task.path, "rb") as f:
        if task.start > 0:
            f.seek(task.start - 1)
            f.readline()  # the line running into `start` belongs to the previous task
        while (offset := f.tell()) < task.stop:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            source = f"{task.path}@{offset}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield Record(source, problem=f"bad record: not valid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                yield Record(source, problem="bad record: not a JSON object")
                continue
            image = obj.get(settings.image_key)
            yield Record(source, root / image if isinstance(image, str) else None,
                         obj.get(_text_field(settings)))


def _read_tar(task: Task, settings: Settings) -> Iterator[Record]:
    """webdataset layout: consecutive members sharing a key (the name up to the first dot
    of its last path part) form one record. A truncated or corrupt tar keeps the records read
    before the damage; the rest of it (the record being read included) becomes one skipped
    record that names the file and the last good key."""
    key, group = None, {}
    try:
        for name, data in _tar_members(task.path):
            folder, _, base = name.rpartition("/")
            stem, _, ext = base.partition(".")
            name = f"{folder}/{stem}" if folder else stem
            if name != key and key is not None:
                yield _tar_record(task.path, key, group, settings)
                group = {}
            key = name
            group[ext.lower()] = data
    except TarDamaged as e:
        # the record being read may lack members: it goes with the rest
        where = f"from record {key!r} on" if key is not None else "from its start"
        yield Record(task.path, problem=f"damaged tar: {task.path} unreadable {where}, the rest of it "
                             f"skipped ({e})")
        return
    if key is not None:
        yield _tar_record(task.path, key, group, settings)


class TarDamaged(Exception):
    """A tar that cannot be read to its end (truncated, corrupt header or compression)."""


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def _tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file, streamed; raises TarDamaged where reading stops
    early. tarfile itself ends silently at a corrupt header past the first member, so for an
    uncompressed tar the bytes after the last member must be the zero padding of a real end."""
    with open(path, "rb") as f:
        compressed = f.read(6).startswith(_COMPRESSED_MAGIC)
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if member.isfile():
                        yield member.name, tar.extractfile(member).read()
                end = tar.offset
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise TarDamaged(f"{type(e).__name__}: {e}") from None
        if not compressed:
            _check_tar_end(f, end)


def _check_tar_end(f: Any, end: int) -> None:
    """After the last member an intact tar holds only zero blocks (the end-of-archive marker)."""
    f.seek(end)
    chunk = f.read(1 << 20)
    if not chunk:
        raise TarDamaged(f"cut at byte {end}: no end-of-archive marker")
    while chunk:
        if chunk.strip(b"\0"):
            raise TarDamaged(f"corrupt member header at byte {end}")
        chunk = f.read(1 << 20)


def _tar_record(path: str, key: str, group: dict[str, bytes], settings: Settings) -> Record:
    source = f"{path}:{key}"
    image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
    field = _text_field(settings)
    try:
        if "txt" in group:
            text = group["txt"].decode("utf-8")
        elif "json" in group:
            text = json.loads(group["json"]).get(field)
        else:
            text = None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        return Record(source, problem=f"bad record: unreadable caption ({e})")
    return Record(source, image, text)


def _read_parquet(task: Task, settings: Settings) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(task.path)
    field = _text_field(settings)
    columns = [c for c in (settings.image_key, field) if c in pf.schema_arrow.names]
    needed = [field] if settings.mode == "text" else [settings.image_key]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{task.path}: no column {missing}; it has {pf.schema_arrow.names} "
                         f"(choose with image_key / caption_key / text_key)")
    root, meta = Path(task.path).parent, pf.metadata
    first_row = sum(meta.row_group(g).num_rows for g in range(task.start))
    for group in range(task.start, task.stop):  # one group at a time: labels name the group
        row = 0
        for batch in pf.iter_batches(batch_size=256, row_groups=[group], columns=columns):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                source = f"{task.path}:row {first_row + row} (group {group} row {row})"
                image = data[settings.image_key][i] if settings.image_key in data else None
                if isinstance(image, dict):  # Hugging Face datasets' Image feature
                    image = image.get("bytes") or image.get("path")
                if isinstance(image, str):
                    image = root / image
                text = data[field][i] if field in data else None
                row += 1
                if isinstance(text, bytes):  # a binary-typed column: UTF-8 by convention
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield Record(source, problem=f"caption not UTF-8: {e}")
                        continue
                yield Record(source, image, text)
        first_row += meta.row_group(group).num_rows


# ---- images ------------------------------------------------------------------------------

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def load_image(source: bytes | Path, size: int) -> np.ndarray:
    """Decode, convert to RGB (see `to_rgb`), resize the shorter side to `size` and
    centre-crop: uint8 (size, size, 3). Raises SkipRecord for what cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
            return resize_center_crop(to_rgb(im), size)
    except FileNotFoundError:
        raise SkipRecord("missing image", str(source)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipRecord("unreadable image", f"{type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """8-bit RGB whatever the stored mode. Pillow's own convert("RGB") clips 16/32-bit
    grayscale to white and drops alpha; here high bit depths are scaled, any transparency
    (an alpha band, or a palette/grayscale transparent colour) is composited on
    `background`, and CMYK goes through its embedded ICC profile when it has one."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PNG/TIFF 16-bit grayscale (Pillow may hold it as 32-bit "I"): 0..65535 -> 0..255
        grey = np.asarray(im).astype(np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    elif im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    profile = im.info.get("icc_profile")
    if profile:
        from PIL import ImageCms

        try:
            return ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                             ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the plain conversion below is still a fair picture
    return im.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


# ---- decode workers: records -> caption ids + pixels, in chunks ---------------------------

@dataclasses.dataclass
class Chunk:
    """Up to `batch_size` usable records of one task, decoded, in record order: what a decode
    worker hands the encoder (one image-tokenizer call). `last` closes the task."""
    task: int
    last: bool = False
    records: int = 0  # every record read, the skipped included
    captions: list[list[int]] = dataclasses.field(default_factory=list)
    pixels: Any = None  # uint8 tensor (n, S, S, 3); None in text mode
    sources: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def pin_memory(self) -> Chunk:
        """Called by the DataLoader's pin-memory thread (CUDA): page-locked pixels copy to
        the GPU without a staging copy."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class DecodedChunks(torch.utils.data.IterableDataset):
    """This rank's tasks, decoded by the DataLoader's workers: worker w takes every W-th task
    whole, so each task's records stay in order and its chunks (the encoder's batches) are the
    same whatever W is. Holds only settings: a worker loads its own text tokenizer."""

    def __init__(self, settings: Settings, tasks: list[Task], image_size: int) -> None:
        self.settings, self.tasks, self.image_size = settings, tasks, image_size
        self._text: TextTokenizer | None = None

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._text is None:
            self._text = load_tokenizers(self.settings, image=False)[0]
        for task in self.tasks[w::n]:
            yield from decode_task(task, self.settings, self._text, self.image_size)


def decode_task(task: Task, s: Settings, text: TextTokenizer, image_size: int
                ) -> Iterator[Chunk]:
    """Read, caption-tokenize and decode one task's records; a chunk per `batch_size`."""
    chunk, images = Chunk(task.index), []
    for record in read_records(task, s):
        chunk.records += 1
        try:
            caption_ids, pixels = prepare_record(record, s, text, image_size)
        except SkipRecord as e:
            chunk.skipped.append((record.source, e.reason, e.detail))
            continue
        except Exception as e:  # noqa: BLE001 - one bad record never stops a run
            chunk.skipped.append((record.source, "failed", f"{type(e).__name__}: {e}"))
            continue
        chunk.captions.append(caption_ids)
        chunk.sources.append(record.source)
        if pixels is not None:
            images.append(pixels)
        if len(chunk.captions) >= s.batch_size:
            yield _seal(chunk, images)
            chunk, images = Chunk(task.index), []
    chunk.last = True
    yield _seal(chunk, images)


def _seal(chunk: Chunk, images: list[np.ndarray]) -> Chunk:
    # one tensor per chunk: one transfer between processes, pinned as a whole on CUDA
    chunk.pixels = torch.from_numpy(np.stack(images)) if images else None
    return chunk


def prepare_record(record: Record, s: Settings, text: TextTokenizer, image_size: int
                   ) -> tuple[list[int], np.ndarray | None]:
    """Caption ids and pixels of one record (pixels None in text mode)."""
    if record.problem:
        reason, _, detail = record.problem.partition(": ")
        raise SkipRecord(reason, detail)
    caption = record.caption
    if s.mode == "text":
        if not isinstance(caption, str) or not caption.strip():
            raise SkipRecord("empty text")
        return text.encode(caption), None
    caption_ids: list[int] = []
    if s.mode == "conditional":
        if not isinstance(caption, str) or not caption.strip():
            raise SkipRecord("empty caption")
        caption_ids = text.encode(caption.strip())
        if not caption_ids:
            raise SkipRecord("empty caption", "no tokens")
    if record.image is None:
        raise SkipRecord("missing image", f"no {s.image_key!r} field")
    return caption_ids, load_image(record.image, image_size)


# ---- the encoder: chunks -> documents -> one committed shard per task --------------------

class ShardWriter:
    """One task's shard: written as NNNNNN.tmp.bin/.idx, renamed to NNNNNN.bin/.idx, then
    NNNNNN.done.json (its counts) written atomically. A shard without its done file is
    partial: a rerun writes it again from the start."""

    def __init__(self, shard_dir: Path, index: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.shard_dir, self.name = shard_dir, f"{index:06d}"
        self.result = TaskResult(index, str(shard_dir / self.name))
        self.builder = IndexedDatasetBuilder(str(shard_dir / f"{self.name}.tmp.bin"),
                                             dtype=np.int32)

    def add_chunk(self, chunk: Chunk, image: ImageTokenizer | None, layout: VocabLayout,
                  mode: Mode) -> None:
        r = self.result
        r.records += chunk.records
        r.skipped += chunk.skipped
        for caption_ids in chunk.captions:
            r.caption_tokens += len(caption_ids)
            r.max_caption_tokens = max(r.max_caption_tokens, len(caption_ids))
            if mode == "conditional":
                r.caption_lengths[len(caption_ids)] += 1
        if mode == "text":
            docs = [make_text_document(c, layout) for c in chunk.captions]
        elif chunk.captions:
            docs = encode_images(chunk, image, layout, r.skipped)
        else:
            docs = []
        for doc in docs:
            self._add(doc.astype(np.int32))

    def _add(self, doc: np.ndarray) -> None:
        self.builder.add_document(doc, [len(doc)])
        r = self.result
        r.documents += 1
        r.tokens += len(doc)
        lo, hi = r.id_range or (int(doc.min()), int(doc.max()))
        r.id_range = (min(lo, int(doc.min())), max(hi, int(doc.max())))

    def commit(self) -> TaskResult:
        tmp = self.shard_dir / f"{self.name}.tmp"
        self.builder.finalize(f"{tmp}.idx")
        for ext in ("bin", "idx"):
            publish_file(f"{tmp}.{ext}", self.shard_dir / f"{self.name}.{ext}")
        write_text_atomic(self.shard_dir / f"{self.name}.done.json",
                          json.dumps(_result_to_json(self.result)) + "\n")
        return self.result


def encode_images(chunk: Chunk, image: ImageTokenizer, layout: VocabLayout,
                  skipped: list[tuple[str, str, str]]) -> list[np.ndarray]:
    """One tokenizer call per chunk; if it fails, each image alone (the bad one skipped)."""
    pixels = chunk.pixels.numpy()
    try:
        codes = list(image.encode(pixels))
    except Exception:  # noqa: BLE001 - retried one by one below to find the culprit
        codes = []
        for source, one in zip(chunk.sources, pixels):
            try:
                codes.append(image.encode(one[None])[0])
            except Exception as e:  # noqa: BLE001
                codes.append(None)
                skipped.append((source, "failed", f"image tokenizer: {type(e).__name__}: {e}"))
    return [make_document(caption_ids, grid, layout)
            for caption_ids, grid in zip(chunk.captions, codes) if grid is not None]


def encode_tasks(settings: Settings, tasks: list[Task], shard_dir: Path,
                 image: ImageTokenizer | None, layout: VocabLayout, device: torch.device,
                 progress: bool) -> None:
    """This rank's tasks through `settings.workers` decode workers into committed shards.
    Chunks of different tasks interleave; each goes to its task's shard, so a shard's bytes
    do not depend on the interleaving."""
    workers = settings.workers if settings.workers > 1 else 0  # 1: decode in this process
    loader = torch.utils.data.DataLoader(
        DecodedChunks(settings, tasks, image.image_size if image else 0), batch_size=None,
        num_workers=workers, pin_memory=device.type == "cuda", collate_fn=_keep,
        multiprocessing_context=_start_method() if workers else None)
    writers: dict[int, ShardWriter] = {}
    with _progress_bar(settings, tasks, progress) as bar:
        for chunk in loader:
            writer = writers.get(chunk.task) or writers.setdefault(
                chunk.task, ShardWriter(shard_dir, chunk.task))
            writer.add_chunk(chunk, image, layout, settings.mode)
            if chunk.last:
                writers.pop(chunk.task).commit()
            bar.update(chunk.records)


def _keep(chunk: Chunk) -> Chunk:
    return chunk


def _start_method() -> str:
    """fork is fast; a CUDA context (a GPU image tokenizer loaded here) cannot be forked."""
    if os.name != "posix" or torch.cuda.is_initialized():
        return "spawn"
    return "fork"


def _progress_bar(settings: Settings, tasks: list[Task], show: bool) -> Any:
    from tqdm import tqdm

    show = show and settings.progress
    return tqdm(total=estimate_records(tasks) if show else None, unit="rec",
                desc=Path(settings.output_prefix).name, disable=not show,
                dynamic_ncols=True, smoothing=0.1)


def _result_to_json(r: TaskResult) -> dict[str, Any]:
    return {"index": r.index, "records": r.records, "documents": r.documents,
            "tokens": r.tokens, "caption_tokens": r.caption_tokens,
            "max_caption_tokens": r.max_caption_tokens,
            "caption_lengths": {str(k): v for k, v in sorted(r.caption_lengths.items())},
            "id_range": list(r.id_range) if r.id_range else None,
            "skipped": [list(s) for s in r.skipped]}


def read_task_result(shard_dir: Path, index: int) -> TaskResult:
    d = json.loads((shard_dir / f"{index:06d}.done.json").read_text())
    return TaskResult(index, str(shard_dir / f"{index:06d}"), d["records"], d["documents"],
                      d["tokens"], d["caption_tokens"], d["max_caption_tokens"],
                      Counter({int(k): v for k, v in d["caption_lengths"].items()}),
                      tuple(d["id_range"]) if d["id_range"] else None,
                      [tuple(s) for s in d["skipped"]])


def committed(shard_dir: Path, index: int) -> bool:
    """The done file is written after the shard's rename: its presence means the shard is whole."""
    name = f"{index:06d}"
    return all((shard_dir / f"{name}.{ext}").is_file() for ext in ("done.json", "bin", "idx"))


# ---- ranks: who encodes which task, and the resume fingerprint ----------------------------

@dataclasses.dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mine(self, tasks: list[Task]) -> list[Task]:
        """Task i goes to rank i mod world size: fixed by the task list alone."""
        return [t for t in tasks if t.index % self.world_size == self.rank]


# encoders wait at the final barrier while the slowest rank finishes its tasks
_BARRIER_TIMEOUT = timedelta(days=7)


def start_ranks() -> Rank:
    """One encoder per process of a torchrun / srun / mpirun job (none: a world of one). The
    process group (gloo: it only carries barriers and small messages) is started here."""
    launch = detect_launch_env()
    if launch.world_size == 1 or torch.distributed.is_initialized():
        return Rank(launch.rank, launch.world_size, launch.local_rank)
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    torch.distributed.init_process_group("gloo", init_method="env://", rank=launch.rank,
                                         world_size=launch.world_size, timeout=_BARRIER_TIMEOUT)
    return Rank(launch.rank, launch.world_size, launch.local_rank)


def encoder_device(rank: Rank) -> torch.device:
    """The GPU of this process's local rank, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(rank.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(rank: Rank) -> None:
    if rank.world_size > 1:
        torch.distributed.barrier()


def agree(rank: Rank, error: str | None) -> None:
    """Every rank raises rank 0's error (so no rank waits for a peer that gave up)."""
    if rank.world_size > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)


def fingerprint(settings: Settings, text: TextTokenizer, image: ImageTokenizer | None,
                tasks: list[Task]) -> dict[str, Any]:
    """What the shards' bytes depend on; a rerun into the same shard folder must match.
    Not the number of encoder processes or decode workers: they do not change the output."""
    files = expand_inputs(settings.inputs)
    return {
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size,
                    "mtime": int(p.stat().st_mtime)} for p in files],
        "mode": settings.mode, "text_tokenizer": text.identity(),
        "image_tokenizer": image.identity() if image is not None else None,
        "image_vocab_size": settings.image_vocab_size, "image_key": settings.image_key,
        "caption_key": settings.caption_key, "text_key": settings.text_key,
        "batch_size": settings.batch_size, "task_bytes": settings.task_bytes,
        "tasks": len(tasks),
    }


def claim_shard_dir(shard_dir: Path, stamp: dict[str, Any], rank: Rank) -> None:
    """Rank 0 records the fingerprint of a new shard folder, or checks an existing one's."""
    error = None
    if rank.leader:
        path = shard_dir / "fingerprint.json"
        shard_dir.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            write_text_atomic(path, json.dumps(stamp, indent=1) + "\n")
        else:
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                old = {"unreadable": str(e)}
            differ = sorted(k for k in stamp.keys() | old.keys() if stamp.get(k) != old.get(k))
            if differ:
                error = (f"{path}: the shards there come from another command (differs in: "
                         f"{', '.join(differ)}); rerun it unchanged to resume, or choose "
                         f"another --output-prefix")
    agree(rank, error)


# ---- summary -----------------------------------------------------------------------------

def _meta(settings: Settings, text: TextTokenizer, image: ImageTokenizer | None,
          results: list[TaskResult]) -> dict[str, Any]:
    skipped = [s for r in results for s in r.skipped]
    documents = sum(r.documents for r in results)
    return {
        "mode": settings.mode,
        "text_tokenizer": factory.describe(*_resolved_text_kind(settings), text),
        "image_tokenizer": factory.describe(*settings.image_tokenizer, image)
        if image is not None else None,
        "inputs": [str(p) for p in expand_inputs(settings.inputs)],
        "records": sum(r.records for r in results),
        "skipped": dict(Counter(why for _, why, _ in skipped).most_common()),
        "skipped_examples": [{"source": s, "reason": w, "detail": d}
                             for s, w, d in skipped[:MAX_LISTED_SKIPS]],
        "max_caption_tokens": max((r.max_caption_tokens for r in results), default=0),
        "mean_caption_tokens": sum(r.caption_tokens for r in results) / max(documents, 1),
        "caption_token_counts": caption_token_counts(results),
    }


def caption_token_counts(results: list[TaskResult]) -> dict[str, int]:
    """How many captions have each length in tokens ({"12": 40, ...}): with it the trainer
    counts the captions longer than any sequence length's budget (see `captions_over`)."""
    total = sum((r.caption_lengths for r in results), Counter())
    return {str(n): total[n] for n in sorted(total)}



def _resolved_text_kind(settings: Settings) -> tuple[str, str]:
    kind, path = settings.text_tokenizer
    return (factory.text_kind_of(path) if kind == "auto" else kind), path


def _write_skip_list(prefix: str, results: list[TaskResult]) -> None:
    path = Path(f"{prefix}.skipped.jsonl")
    skipped = [s for r in results for s in r.skipped]
    if not skipped:
        path.unlink(missing_ok=True)
        return
    with open(path, "w") as f:
        for source, reason, detail in skipped:
            f.write(json.dumps({"source": source, "reason": reason, "detail": detail}) + "\n")


def format_summary(summary: Summary) -> str:
    where = (f"{summary.prefix}.shards.json ({summary.shards:,} shards)" if summary.shards
             else f"{summary.prefix}.bin/.idx")
    lines = [f"wrote {summary.documents:,} documents ({summary.tokens:,} tokens) from "
             f"{summary.records:,} records to {where} in "
             f"{summary.seconds:.1f}s ({summary.records / max(summary.seconds, 1e-9):,.0f} "
             f"records/s)"]
    if summary.skipped:
        lines.append(f"skipped {sum(summary.skipped.values()):,} records: " + ", ".join(
            f"{n:,} {why}" for why, n in summary.skipped.items()))
        for ex in summary.sidecar["skipped_examples"][:10]:
            lines.append(f"  {ex['source']}: {ex['reason']} {ex['detail']}".rstrip())
        lines.append(f"  (all of them in {summary.prefix}.skipped.jsonl)")
    return "\n".join(lines)


# ---- tokenizer fitting from the same inputs ----------------------------------------------

def iter_texts(inputs: Iterable[str], field: str = "caption", limit: int | None = None,
               skipped: list[tuple[str, str, str]] | None = None) -> Iterator[str]:
    """Non-empty captions (or texts) of the inputs, for training a text tokenizer. Records a
    reader could not parse (a damaged tar's rest, bad JSON) go to `skipped` as
    (source, reason, detail) when a list is given."""
    settings = Settings(tuple(inputs), "", mode="text", text_key=field, image_key="")
    seen = 0
    for task in plan_tasks(expand_inputs(inputs)):
        for record in read_records(task, settings):
            if record.problem:
                _note_skip(skipped, record.source, record.problem)
            elif isinstance(record.caption, str) and record.caption.strip():
                yield record.caption.strip()
                seen += 1
                if limit is not None and seen >= limit:
                    return


def collect_images(inputs: Iterable[str], image_size: int, limit: int, image_key: str = "image",
                   skipped: list[tuple[str, str, str]] | None = None) -> np.ndarray:
    """Up to `limit` readable images, resized and centre-cropped: uint8 (N, S, S, 3). Records
    that are damaged or hold no readable image go to `skipped` when a list is given."""
    settings = Settings(tuple(inputs), "", mode="unconditional", image_key=image_key)
    images = []
    for task in plan_tasks(expand_inputs(inputs)):
        for record in read_records(task, settings):
            if len(images) >= limit:
                return np.stack(images)
            if record.problem or record.image is None:
                _note_skip(skipped, record.source, record.problem or
                           f"missing image: no {image_key!r} field")
                continue
            try:
                images.append(load_image(record.image, image_size))
            except SkipRecord as e:
                _note_skip(skipped, record.source, f"{e.reason}: {e.detail}")
    if not images:
        raise ValueError(f"no readable image in {list(inputs)}")
    return np.stack(images)


def _note_skip(skipped: list[tuple[str, str, str]] | None, source: str, problem: str) -> None:
    if skipped is not None:
        reason, _, detail = problem.partition(": ")
        skipped.append((source, reason, detail))


def format_skips(skipped: list[tuple[str, str, str]], shown: int = 10) -> str:
    """`skipped N records: 2 damaged tar, ...` and the first few, one per line."""
    counts = Counter(why for _, why, _ in skipped)
    lines = [f"skipped {len(skipped):,} records: " + ", ".join(
        f"{n:,} {why}" for why, n in counts.most_common())]
    lines += [f"  {src}: {why} {detail}".rstrip() for src, why, detail in skipped[:shown]]
    return "\n".join(lines)
