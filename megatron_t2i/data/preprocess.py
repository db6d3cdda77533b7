"""Image-caption corpora -> indexed token files (`<prefix>.bin/.idx/.vocab.json`).

Inputs (by file name; a folder means every such file in it, sorted):
  *.jsonl    one JSON object per line: an image path (relative to the file) and a caption
  *.tar      webdataset shards: members grouped by key (`k.jpg` + `k.txt` or `k.json`)
  *.parquet  an image column (bytes, a {bytes, path} struct, or a path) and a caption column

Modes: `conditional` writes `[bos] caption [boi] codes [eoi]`, `unconditional` writes
`[bos] [boi] codes [eoi]` (the caption is ignored), `text` writes `[bos] text [eod]` for text
corpora blended in (the dataset packs those GPT-style).

The inputs are cut into tasks (byte ranges of a jsonl, one tar, row groups of a parquet); each
worker process turns a task into a shard of its own, and the shards are merged in task order,
so the output does not depend on the number of workers. A record that cannot be used (missing
or unreadable image, empty caption, bad JSON, any exception) is skipped and counted, never fatal;
the counts go to the sidecar and every skipped record to `<prefix>.skipped.jsonl`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from megatron_t2i.data.documents import make_document, make_text_document
from megatron_t2i.data.indexed import merge_indexed, paths
from megatron_t2i.tokenizers import factory
from megatron_t2i.tokenizers.image import ImageTokenizer
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.vocab import VocabLayout

Mode = Literal["conditional", "unconditional", "text"]
FORMATS = {".jsonl": "jsonl", ".tar": "tar", ".parquet": "parquet"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_LISTED_SKIPS = 100  # skipped records quoted in the sidecar (all of them go to .skipped.jsonl)


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
    workers: int = 1
    batch_size: int = 64  # images per image-tokenizer call
    progress: bool = True


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


class SkipRecord(Exception):
    """A record that cannot be used; `reason` is the counted category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---- the entry point ---------------------------------------------------------------------

def preprocess(settings: Settings) -> Summary:
    """Tokenize the inputs into `<output_prefix>.bin/.idx/.vocab.json`; returns the summary."""
    t0 = time.perf_counter()
    text, image = load_tokenizers(settings)
    layout = _layout(settings, text, image)
    tasks = plan_tasks(expand_inputs(settings.inputs), settings.workers)
    shard_dir = Path(f"{settings.output_prefix}.shards")
    shutil.rmtree(shard_dir, ignore_errors=True)
    shard_dir.mkdir(parents=True)
    try:
        results = _run_tasks(settings, tasks, shard_dir)
        meta = _meta(settings, text, image, results)
        if not sum(r.documents for r in results):
            raise ValueError(f"{settings.output_prefix}: no document written from "
                             f"{meta['records']} records; skipped: {meta['skipped']}")
        _write_skip_list(settings.output_prefix, results)
        ranges = [r.id_range for r in results if r.id_range is not None]
        documents, tokens = merge_indexed(settings.output_prefix, [r.shard for r in results],
                                          layout, meta, (min(lo for lo, _ in ranges),
                                                         max(hi for _, hi in ranges)))
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    sidecar = json.loads(paths(settings.output_prefix)["vocab.json"].read_text())
    return Summary(settings.output_prefix, meta["records"], documents, tokens, meta["skipped"],
                   time.perf_counter() - t0, sidecar)


def load_tokenizers(settings: Settings) -> tuple[TextTokenizer, ImageTokenizer | None]:
    """Both tokenizers; the text one even for image-only files, since the vocabulary layout
    (its size, bos/eos) is shared with the image-caption files they are trained with."""
    kind, path = settings.text_tokenizer
    if not path:
        raise ValueError("preprocessing needs a text tokenizer (it defines the vocabulary "
                         "layout, even for unconditional files)")
    text = factory.load_text_tokenizer(kind, path, **dict(settings.text_tokenizer_options))
    image = None
    if settings.image_tokenizer is not None:
        image = factory.load_image_tokenizer(*settings.image_tokenizer)
    elif settings.mode != "text":
        raise ValueError(f"mode {settings.mode!r} needs an image tokenizer")
    return text, image


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


def plan_tasks(files: list[Path], workers: int) -> list[Task]:
    """Cut each file into tasks: enough of them (about 4 per worker) to keep workers busy."""
    tasks: list[Task] = []
    for path in files:
        fmt = FORMATS[path.suffix]
        if fmt == "jsonl":
            size = path.stat().st_size
            step = max(1 << 16, -(-size // (4 * workers)))
            spans = [(s, min(s + step, size)) for s in range(0, size, step)] or [(0, 0)]
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(path).metadata.num_row_groups
            step = max(1, -(-groups // (4 * workers)))  # consecutive row groups per task
            spans = [(g, min(g + step, groups)) for g in range(0, groups, step)]
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


# ---- workers -----------------------------------------------------------------------------

_worker: dict[str, Any] = {}  # per process: settings, tokenizers, layout, progress counter


def _init_worker(settings: Settings, counter: Any) -> None:
    text, image = load_tokenizers(settings)
    _worker.update(settings=settings, text=text, image=image,
                   layout=_layout(settings, text, image), counter=counter)


def process_task(task: Task, shard_dir: str) -> TaskResult:
    """Turn one task into one shard file; runs in a worker after `_init_worker`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    s: Settings = _worker["settings"]
    result = TaskResult(task.index, str(Path(shard_dir) / f"{task.index:06d}"))
    builder = IndexedDatasetBuilder(f"{result.shard}.bin", dtype=np.int32)
    pending: list[tuple[Record, list[int], np.ndarray]] = []

    def add(doc: np.ndarray) -> None:
        builder.add_document(doc, [len(doc)])
        result.documents += 1
        lo, hi = result.id_range or (int(doc.min()), int(doc.max()))
        result.id_range = (min(lo, int(doc.min())), max(hi, int(doc.max())))

    def flush() -> None:
        for doc in _encode_images(pending, result):
            add(doc)
        pending.clear()

    for record in read_records(task, s):
        result.records += 1
        if result.records % 64 == 0:
            _count(64)
        try:
            caption_ids, pixels = _prepare(record, s)
        except SkipRecord as e:
            result.skipped.append((record.source, e.reason, e.detail))
            continue
        except Exception as e:  # noqa: BLE001 - one bad record never stops a run
            result.skipped.append((record.source, "failed", f"{type(e).__name__}: {e}"))
            continue
        result.caption_tokens += len(caption_ids)
        result.max_caption_tokens = max(result.max_caption_tokens, len(caption_ids))
        if pixels is not None and s.mode == "conditional":
            result.caption_lengths[len(caption_ids)] += 1
        if pixels is None:
            add(make_text_document(caption_ids, _worker["layout"]).astype(np.int32))
        else:
            pending.append((record, caption_ids, pixels))
            if len(pending) >= s.batch_size:
                flush()
    flush()
    _count(result.records % 64)
    builder.finalize(f"{result.shard}.idx")
    return result


def _prepare(record: Record, s: Settings) -> tuple[list[int], np.ndarray | None]:
    """Caption ids and pixels of one record (pixels None in text mode)."""
    if record.problem:
        reason, _, detail = record.problem.partition(": ")
        raise SkipRecord(reason, detail)
    text = record.caption
    if s.mode == "text":
        if not isinstance(text, str) or not text.strip():
            raise SkipRecord("empty text")
        return _worker["text"].encode(text), None
    caption_ids: list[int] = []
    if s.mode == "conditional":
        if not isinstance(text, str) or not text.strip():
            raise SkipRecord("empty caption")
        caption_ids = _worker["text"].encode(text.strip())
        if not caption_ids:
            raise SkipRecord("empty caption", "no tokens")
    if record.image is None:
        raise SkipRecord("missing image", f"no {s.image_key!r} field")
    return caption_ids, load_image(record.image, _worker["image"].image_size)


def _encode_images(pending: list[tuple[Record, list[int], np.ndarray]],
                   result: TaskResult) -> Iterator[np.ndarray]:
    """One tokenizer call per batch; if the batch fails, each record alone (skip the bad)."""
    if not pending:
        return
    image: ImageTokenizer = _worker["image"]
    try:
        codes = image.encode(np.stack([p for _, _, p in pending]))
    except Exception:  # noqa: BLE001 - retried one by one below to find the culprit
        codes = []
        for record, _, pixels in pending:
            try:
                codes.append(image.encode(pixels[None])[0])
            except Exception as e:  # noqa: BLE001
                codes.append(None)
                result.skipped.append((record.source, "failed",
                                       f"image tokenizer: {type(e).__name__}: {e}"))
    for (_, caption_ids, _), grid in zip(pending, codes):
        if grid is not None:
            yield make_document(caption_ids, grid, _worker["layout"]).astype(np.int32)


def _count(n: int) -> None:
    counter = _worker.get("counter")
    if counter is not None and n:
        with counter.get_lock():
            counter.value += n


def _run_tasks(settings: Settings, tasks: list[Task], shard_dir: Path) -> list[TaskResult]:
    """All tasks, in worker processes when workers > 1; results in task order."""
    ctx = mp.get_context(_start_method())
    counter = ctx.Value("q", 0)
    if settings.workers <= 1:
        _init_worker(settings, counter)
        with _progress_bar(settings, tasks) as bar:
            results = []
            for task in tasks:
                results.append(process_task(task, str(shard_dir)))
                bar.update(counter.value - bar.n)
        _worker.clear()
        return results
    # the pool forks before the progress bar starts its monitor thread
    with ctx.Pool(settings.workers, _init_worker, (settings, counter)) as pool, \
            _progress_bar(settings, tasks) as bar:
        pending = [pool.apply_async(process_task, (t, str(shard_dir))) for t in tasks]
        while not all(p.ready() for p in pending):
            time.sleep(0.2)
            bar.update(counter.value - bar.n)
        bar.update(counter.value - bar.n)
        return [p.get() for p in pending]  # re-raises a worker's error


def _start_method() -> str:
    """fork is fast; a CUDA context (a GPU image tokenizer loaded here) cannot be forked."""
    torch = sys.modules.get("torch")
    if os.name != "posix" or (torch is not None and torch.cuda.is_initialized()):
        return "spawn"
    return "fork"


def _progress_bar(settings: Settings, tasks: list[Task]) -> Any:
    from tqdm import tqdm

    return tqdm(total=estimate_records(tasks) if settings.progress else None, unit="rec",
                desc=Path(settings.output_prefix).name, disable=not settings.progress,
                dynamic_ncols=True, smoothing=0.1)


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
    lines = [f"wrote {summary.documents:,} documents ({summary.tokens:,} tokens) from "
             f"{summary.records:,} records to {summary.prefix}.bin/.idx in "
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
    for task in plan_tasks(expand_inputs(inputs), 1):
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
    for task in plan_tasks(expand_inputs(inputs), 1):
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
