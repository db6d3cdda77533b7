"""Vocabulary surgery: grow a trained checkpoint's vocabulary by image codes and specials.

    resize_vocab("ckpt/openlm_1b", "ckpt/openlm_1b_t2i", image_size=16384, tensor_parallel=2)

The new layout keeps the source's text ids (rows copied bit for bit), keeps every image code
and special the source already has (moved to their new ids), adds the missing image codes and
specials, and pads to `make_vocab_size_divisible_by x TP` of the *target* TP. Old padding rows
are dropped; new padding rows are zero. New real rows are initialised by choice:

    normal     N(0, init_method_std of the source config)
    mean       every new row = the mean of the existing text rows
    mean_std   N(mean, std) of the existing text rows, per hidden dimension
    file       image-code rows read from a file (safetensors, or torch with weights_only):
               `word_embeddings` [new image codes, hidden] and optionally `output_layer`
               (the rows of the untied output layer; else those get `normal`);
               new specials get `normal`

Only the word embeddings and output layer are held in memory (old and new table); every other
tensor streams from the source to the output one stored chunk at a time, keeping the source's
chunks (io.write_checkpoint): for a trainer checkpoint that is one layer's TP slice, so the
peak memory is the two vocabulary tables, whatever the depth of the model. The torch_dist
format stores global tensors, so the target TP only changes the padding; the trainer slices
at load time. Optimizer state is dropped unless `keep_optimizer`, which grows the moments of
the resized tables with zeros (the regular optimizer's per-parameter state only).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_t2i.checkpoint.io import (
    CheckpointReader,
    Chunk,
    TensorSpec,
    WriteStats,
    reason,
    write_checkpoint,
)
from megatron_t2i.checkpoint.layout import CheckpointError, staged_output, write_latest
from megatron_t2i.model.keys import vocab_table_keys
from megatron_t2i.vocab import VocabLayout

InitMethod = Literal["normal", "mean", "mean_std", "file"]
_OPTIM_STATE = re.compile(r"^optimizer\.state\.([A-Za-z0-9_]+)\.(.+)$")


@dataclass(frozen=True)
class RowPlan:
    """Where each row of the new table comes from."""

    copies: list[tuple[int, int, int]]  # (new start, old start, count)
    new_image: tuple[int, int]  # [start, stop) of image-code rows to initialise
    new_specials: list[int]  # ids of added specials to initialise
    size: int  # real ids of the new layout
    padded: int


def target_layout(source: VocabLayout, image_size: int,
                  specials: Sequence[str] = ("<boi>", "<eoi>")) -> VocabLayout:
    """The grown layout: the source's text range, `image_size` codes, the specials."""
    if image_size < source.image_size:
        raise CheckpointError(
            f"the source has {source.image_size} image codes; shrinking to {image_size} would "
            f"drop trained rows")
    specials = tuple(specials)
    if source.text_pad_id is None and "<pad>" not in specials:
        specials += ("<pad>",)
    missing = [s for s in source.added_specials if s not in specials]
    if missing:
        raise CheckpointError(f"the source's specials {missing} are not in the target "
                                  f"specials {list(specials)}; their trained rows would be lost")
    return VocabLayout(text_size=source.text_size, image_size=image_size, bos_id=source.bos_id,
                       eod_id=source.eod_id, added_specials=specials,
                       text_pad_id=source.text_pad_id)


def padded_size(layout: VocabLayout, tensor_parallel: int, divisible_by: int,
                explicit: int | None = None) -> int:
    """Megatron's rule (or an explicit size), checked against the layout and the TP size."""
    padded = explicit if explicit is not None else layout.padded_size(divisible_by,
                                                                      tensor_parallel)
    if padded < layout.text_size:
        raise CheckpointError(f"a vocabulary of {padded} rows would shrink below the "
                                  f"{layout.text_size} text ids")
    if padded < layout.size:
        raise CheckpointError(f"a vocabulary of {padded} rows cannot hold the layout's "
                                  f"{layout.size} ids (text, image codes, specials)")
    if padded % tensor_parallel:
        raise CheckpointError(f"the padded vocabulary ({padded} rows) is not divisible by "
                                  f"tensor_model_parallel_size={tensor_parallel}")
    return padded


def plan_rows(old: VocabLayout, new: VocabLayout, padded: int) -> RowPlan:
    copies = [(0, 0, old.text_size)]
    if old.image_size:
        copies.append((new.image_start, old.image_start, old.image_size))
    new_specials = []
    for name in new.added_specials:
        if name in old.added_specials:
            copies.append((new.special_id(name), old.special_id(name), 1))
        else:
            new_specials.append(new.special_id(name))
    new_image = (new.image_start + old.image_size, new.image_start + new.image_size)
    return RowPlan(copies, new_image, new_specials, new.size, padded)


# ---- new rows --------------------------------------------------------------------------------

ROW_BLOCK = 1024  # rows drawn (and row statistics summed) at a time: 8 MB of float32 at 2048


@dataclass
class RowInit:
    method: InitMethod = "normal"
    std: float = 0.02
    seed: int = 1234
    file: Path | None = None
    file_rows: dict[str, torch.Tensor] | None = None  # loaded from `file`, per table name

    def fill(self, out: torch.Tensor, table: str, key: str, existing: torch.Tensor,
             image: bool) -> None:
        """Write the new rows of `key` into `out` [n, hidden], from `existing` (the old text
        rows). Drawn in float32 a block of rows at a time (the same numbers as one draw), so
        16k new rows of a 1B model never exist in float32 at once."""
        if self.method == "file" and image and self.file_rows and table in self.file_rows:
            out.copy_(self.file_rows[table])
            return
        if self.method in ("mean", "mean_std"):
            mean, std = _row_stats(existing)
            if self.method == "mean":
                out.copy_(mean.float().expand_as(out))
                return
        gen = torch.Generator().manual_seed(_seed(self.seed, key, image))
        for a in range(0, out.shape[0], ROW_BLOCK):
            n = min(ROW_BLOCK, out.shape[0] - a)
            if self.method == "mean_std":
                noise = torch.randn(n, out.shape[1], generator=gen, dtype=torch.float64)
                out[a:a + n] = (mean + noise * std).float()
            else:
                out[a:a + n] = torch.randn(n, out.shape[1], generator=gen) * self.std


def _row_stats(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and (unbiased) std in float64, summed a block of rows at a time."""
    blocks = [rows[a:a + ROW_BLOCK] for a in range(0, rows.shape[0], ROW_BLOCK)]
    mean = sum(b.double().sum(0) for b in blocks) / rows.shape[0]
    var = sum(((b.double() - mean) ** 2).sum(0) for b in blocks) / max(rows.shape[0] - 1, 1)
    return mean, var.sqrt()


def _seed(seed: int, key: str, image: bool) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{'image' if image else 'specials'}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def load_init_file(path: Path, n_new_image: int, hidden: int, untied: bool
                   ) -> dict[str, torch.Tensor]:
    """Rows for the new image codes: `word_embeddings` (required), `output_layer` (optional)."""
    if not path.is_file():
        raise CheckpointError(f"--init-file {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors or torch file "
                                  f"({reason(e)})") from None
    if not isinstance(tensors, dict) or "word_embeddings" not in tensors:
        raise CheckpointError(f"{path}: expected a tensor named 'word_embeddings' "
                                  f"[{n_new_image}, {hidden}] (and optionally 'output_layer')")
    out = {}
    for name in ("word_embeddings", "output_layer"):
        if name not in tensors or (name == "output_layer" and not untied):
            continue
        t = tensors[name]
        if tuple(t.shape) != (n_new_image, hidden):
            raise CheckpointError(
                f"{path}: '{name}' is {tuple(t.shape)}, the layout needs "
                f"[{n_new_image}, {hidden}] (one row per new image code)")
        out[name] = t
    return out


def grow_table(old: torch.Tensor, plan: RowPlan, key: str, init: RowInit,
               zero_new: bool = False, new_rows_from: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The resized table: copied rows bit-identical, padding zero, new rows initialised
    (or zero: optimizer moments; or taken from `new_rows_from`: an fp32 master copy)."""
    new = torch.zeros(plan.padded, old.shape[1], dtype=old.dtype)
    for dst, src, n in plan.copies:
        new[dst:dst + n] = old[src:src + n]
    start, stop = plan.new_image
    if zero_new:
        return new
    if new_rows_from is not None:
        new[start:stop] = new_rows_from[start:stop].to(old.dtype)
        new[plan.new_specials] = new_rows_from[plan.new_specials].to(old.dtype)
        return new
    table = "word_embeddings" if key == vocab_table_keys()[0] else "output_layer"
    text = old[:plan.copies[0][2]]
    if stop > start:
        init.fill(new[start:stop], table, key, text, image=True)
    if plan.new_specials:
        rows = torch.empty(len(plan.new_specials), old.shape[1], dtype=old.dtype)
        init.fill(rows, table, key, text, image=False)
        new[plan.new_specials] = rows
    return new


# ---- the tool --------------------------------------------------------------------------------

def resize_vocab(source: str | Path, output: str | Path, image_size: int = 16384,
                 specials: Sequence[str] = ("<boi>", "<eoi>"),
                 tensor_parallel: int | None = None, divisible_by: int | None = None,
                 padded_vocab_size: int | None = None, init: InitMethod = "normal",
                 init_file: str | Path | None = None, init_std: float | None = None,
                 seed: int = 1234, keep_optimizer: bool = False, overwrite: bool = False
                 ) -> WriteStats:
    """Write `output` (a checkpoint root: iter_N/ + latest) with the grown vocabulary."""
    reader = CheckpointReader(source)
    meta = reader.meta
    config = meta.get("config", {})
    old_layout = _source_layout(reader)
    tp = tensor_parallel or config.get("parallel", {}).get("tensor_model_parallel_size", 1)
    divisor = divisible_by or config.get("model", {}).get("make_vocab_size_divisible_by", 128)
    new_layout = target_layout(old_layout, image_size, specials)
    padded = padded_size(new_layout, tp, divisor, padded_vocab_size)
    plan = plan_rows(old_layout, new_layout, padded)
    embedding, output_layer = vocab_table_keys()
    vocab_keys = [k for k in (embedding, output_layer) if k in reader.tensor_keys()]
    hidden = reader.spec(vocab_keys[0]).shape[1]
    row_init = RowInit(init, init_std or config.get("model", {}).get("init_method_std", 0.02),
                       seed)
    if init == "file":
        if init_file is None:
            raise CheckpointError("--init file needs --init-file PATH")
        row_init.file = Path(init_file)
        row_init.file_rows = load_init_file(Path(init_file), plan.new_image[1] - plan.new_image[0],
                                            hidden, output_layer in vocab_keys)

    entries, grown = _plan_entries(reader, vocab_keys, padded, keep_optimizer)
    tables: dict[str, torch.Tensor] = {}

    def produce(key: str) -> torch.Tensor:
        """A resized table (or its optimizer state), whole."""
        if key in grown:
            state_name, model_key = grown[key]
            if state_name == "fp32_param":  # the fp32 master copy of the new rows
                weights = tables[model_key] if model_key in tables else produce(model_key)
                return grow_table(reader.read(key), plan, key, row_init, new_rows_from=weights)
            return grow_table(reader.read(key), plan, key, row_init, zero_new=True)
        table = grow_table(reader.read(key), plan, key, row_init)
        if keep_optimizer:
            tables[key] = table
        return table

    def produce_chunk(key: str, chunk: Chunk) -> torch.Tensor:
        if key in grown or key in vocab_keys:  # planned as one chunk
            return produce(key)
        return reader.read(key, chunk)  # a stored chunk of the source, as it is

    common = reader.common()
    has_optimizer = keep_optimizer and meta.get("has_optimizer", False)
    if not has_optimizer:
        common.pop("optimizer", None)
    out_meta = _output_meta(meta, new_layout, padded, tp, divisor, has_optimizer,
                            dict(source=str(reader.folder), image_size=image_size,
                                 init=init, init_file=str(init_file) if init_file else None,
                                 seed=seed))
    iteration = int(meta.get("iteration", common.get("iteration", 0)))
    with staged_output(output, overwrite, sources=(Path(source), reader.folder)) as tmp:
        stats = write_checkpoint(tmp / reader.folder.name, entries, None, common, out_meta,
                                 desc="resize_vocab", produce_chunk=produce_chunk)
        write_latest(tmp, iteration)
    stats.extra.update(padded_vocab_size=padded, layout=new_layout)
    return stats


def _source_layout(reader: CheckpointReader) -> VocabLayout:
    meta = reader.meta
    if "vocab" not in meta or "padded_vocab_size" not in meta:
        raise CheckpointError(f"{reader.folder}/meta.json has no vocabulary layout "
                                  f"('vocab', 'padded_vocab_size')")
    layout = VocabLayout.from_dict(meta["vocab"])
    padded = meta["padded_vocab_size"]
    embedding = vocab_table_keys()[0]
    keys = [k for k in vocab_table_keys() if k in reader.tensor_keys()]
    if embedding not in keys:
        raise CheckpointError(f"{reader.folder}: no {embedding} "
                                  f"(a checkpoint of a later pipeline stage only?)")
    for key in keys:
        rows = reader.spec(key).shape[0]
        if rows != padded:
            raise CheckpointError(
                f"{reader.folder}: layout mismatch: meta.json says {padded} vocabulary rows, "
                f"{key} has {rows}")
    if layout.size > padded:
        raise CheckpointError(f"{reader.folder}: layout mismatch: the layout has "
                                  f"{layout.size} ids but the tables only {padded} rows")
    return layout


def _plan_entries(reader: CheckpointReader, vocab_keys: list[str], padded: int,
                  keep_optimizer: bool) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """Every output entry, and which optimizer tensors follow a resized table. A copied
    tensor keeps the source's chunks; a resized one is planned whole."""
    entries: dict[str, Any] = {}
    grown: dict[str, tuple[str, str]] = {}
    model_keys = {k for k in reader.tensor_keys() if not k.startswith("optimizer")}
    for key in reader.tensor_keys():
        spec = reader.spec(key)
        if key.startswith("optimizer"):
            if not keep_optimizer:
                continue
            m = _OPTIM_STATE.match(key)
            if m is None or m.group(2) not in model_keys:
                raise CheckpointError(
                    f"{reader.folder}: optimizer state {key!r} is not per-parameter state of "
                    f"the regular optimizer (a distributed optimizer's?); it cannot be grown: "
                    f"drop the optimizer state (the default)")
            if m.group(2) in vocab_keys:
                grown[key] = (m.group(1), m.group(2))
                spec = TensorSpec((padded,) + spec.shape[1:], spec.dtype)
        elif key in vocab_keys:
            spec = TensorSpec((padded,) + spec.shape[1:], spec.dtype)
        entries[key] = spec
    for key in reader.object_keys():
        if key.startswith("optimizer"):
            if keep_optimizer:
                raise CheckpointError(
                    f"{reader.folder}: optimizer object {key!r} (distributed optimizer state) "
                    f"cannot be grown: drop the optimizer state (the default)")
            continue
        entries[key] = reader.read_object_bytes(key)
    return entries, grown


def _output_meta(meta: dict[str, Any], layout: VocabLayout, padded: int, tp: int, divisor: int,
                 has_optimizer: bool, surgery: dict[str, Any]) -> dict[str, Any]:
    """The source's meta with the new layout. `parallel` stays the source's: it says which
    layout the per-rank state (RNG) was saved under, so the trainer restores it only there."""
    out = dict(meta, vocab=layout.to_dict(), padded_vocab_size=padded,
               has_optimizer=has_optimizer)
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in meta.get("config", {}).items()}
    config.setdefault("parallel", {})["tensor_model_parallel_size"] = tp
    config.setdefault("model", {})["make_vocab_size_divisible_by"] = divisor
    config.setdefault("data", {})["image_vocab_size"] = layout.image_size
    out["config"] = config
    out["surgery"] = dict(surgery, padded_for_tensor_model_parallel_size=tp,
                          make_vocab_size_divisible_by=divisor)
    return out
