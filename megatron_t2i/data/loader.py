"""From token files to the microbatches the schedule pulls.

Every rank of a tensor- and pipeline-parallel group reads the same microbatches (the sampler
is keyed by the data-parallel rank only); reading is cheap next to a step, and it spares a
broadcast. With the interleaved schedule each model chunk pulls from its own iterator over
the same stream.

Every prefix is checked (files, layout, tokenizers, image tokens per sample) before the first
step, so a bad input fails at start-up with the file named, never hours into a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.utils.data import Dataset

from megatron_t2i.config import Config, ConfigError
from megatron_t2i.data.blend import BlendedDataset
from megatron_t2i.data.dataset import PackedTextDataset, T2IDataset, split_documents
from megatron_t2i.data.demo import prepare_demo_corpus
from megatron_t2i.data.indexed import DataFileError, open_indexed, read_sidecar, token_files
from megatron_t2i.data.sampler import DataParallelSampler
from megatron_t2i.platform import Platform
from megatron_t2i.timers import Stopwatch, TimedIterator
from megatron_t2i.vocab import VocabLayout, VocabMismatchError


@dataclass
class DataPipeline:
    layout: VocabLayout
    train: Dataset  # T2IDataset, PackedTextDataset or a BlendedDataset of them
    valid: Dataset
    num_microbatches: int
    micro_batch_size: int
    seed: int
    device: torch.device
    n_iterators: int
    consumed_samples: int = 0
    data_wait: Stopwatch = field(default_factory=Stopwatch)  # time blocked in next()
    _train_iters: list[Iterator] | None = None

    def set_consumed_samples(self, consumed: int) -> None:
        self.consumed_samples = consumed
        self._train_iters = None

    def train_iterators(self) -> list[Iterator]:
        """Persistent iterators over the training stream (one per model chunk)."""
        if self._train_iters is None:
            self._train_iters = [self._iterator(self.train, self.consumed_samples, shuffle=True)
                                 for _ in range(self.n_iterators)]
        return self._train_iters

    def valid_iterators(self) -> list[Iterator]:
        """Fresh iterators from the start of the validation split: every evaluation sees the
        same samples."""
        return [self._iterator(self.valid, 0, shuffle=False) for _ in range(self.n_iterators)]

    def _iterator(self, dataset: Dataset, consumed: int, shuffle: bool) -> Iterator:
        sampler = DataParallelSampler(
            len(dataset), consumed, self.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(), seed=self.seed, shuffle=shuffle)
        batches = (collate([dataset[i] for i in indices], self.device) for indices in sampler)
        return TimedIterator(batches, self.data_wait)


def collate(items: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    b, s = batch["tokens"].shape
    batch["position_ids"] = torch.arange(s, dtype=torch.int64).unsqueeze(0).expand(b, s)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def build_data_pipeline(cfg: Config, platform: Platform) -> DataPipeline:
    if dist.get_rank() == 0 and _uses_demo(cfg):
        prepare_demo_corpus(cfg.data, cfg.train.seed)  # rank 0 generates, the others reuse
    dist.barrier()
    sources, layout = resolve_sources(cfg)
    if dist.get_rank() == 0 and (line := long_captions_line(cfg, sources)):
        print(line, flush=True)
    dp = parallel_state.get_data_parallel_world_size()
    train, valid = build_datasets(cfg, sources, layout, min_samples=cfg.train.micro_batch_size * dp)
    return DataPipeline(
        layout=layout, train=train, valid=valid,
        num_microbatches=cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp),
        micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
        device=platform.device(),
        n_iterators=cfg.parallel.virtual_pipeline_model_parallel_size or 1)


@dataclass(frozen=True)
class Source:
    """One token-file prefix of the training data and its blend weight (None: its size)."""
    prefix: str
    weight: float | None
    sidecar: dict[str, Any]

    @property
    def is_text(self) -> bool:
        return self.sidecar.get("mode") == "text"


def _uses_demo(cfg: Config) -> bool:
    return cfg.data.data_path is None and not cfg.data.data_paths


def resolve_sources(cfg: Config) -> tuple[list[Source], VocabLayout]:
    """The configured prefixes (or the demo corpus, already generated), each checked before
    training starts: its files exist, its layout and tokenizers agree with the other prefixes
    and with the config."""
    if _uses_demo(cfg):
        prefix = prepare_demo_corpus(cfg.data, cfg.train.seed)[0]
        return [Source(prefix, None, read_sidecar(prefix))], \
            VocabLayout.from_dict(read_sidecar(prefix)["layout"])
    prefixes = cfg.data.data_paths or [cfg.data.data_path]
    weights = cfg.data.data_weights or [None] * len(prefixes)
    sources = [Source(str(p), w, _read_checked_sidecar(str(p))) for p, w in zip(prefixes, weights)]
    first = sources[0]
    layout = VocabLayout.from_dict(first.sidecar["layout"])
    for other in sources[1:]:
        layout.check_matches(VocabLayout.from_dict(other.sidecar["layout"]),
                             mine=f"{first.prefix}.vocab.json",
                             theirs=f"{other.prefix}.vocab.json")
        _check_same_tokenizers(first, other)
    for key, have in (("text_vocab_size", layout.text_size),
                      ("image_vocab_size", layout.image_size)):
        want = getattr(cfg.data, key)
        if want != have:
            raise VocabMismatchError(f"data.{key}={want} but the token files {first.prefix} "
                                     f"were written with {have} (see {first.prefix}.vocab.json)")
    for src in sources:
        image = src.sidecar.get("image_tokenizer") or {}
        have = image.get("tokens_per_image")
        if not src.is_text and have is not None and have != cfg.data.image_tokens_per_sample:
            raise VocabMismatchError(
                f"data.image_tokens_per_sample={cfg.data.image_tokens_per_sample} but the "
                f"images of {src.prefix} have {have} codes (see {src.prefix}.vocab.json)")
    return sources, layout


def long_captions_line(cfg: Config, sources: list[Source]) -> str | None:
    """One line on the captions longer than this sequence length leaves room for (their
    ends are cut, see dataset.fit_document), from the sidecars' caption_token_counts."""
    budget = cfg.model.seq_length - cfg.data.image_tokens_per_sample - 2  # bos, boi, eoi
    over = total = longest = 0
    where = ""
    for src in sources:
        counts = {int(k): v for k, v in (src.sidecar.get("caption_token_counts") or {}).items()}
        over += sum(v for k, v in counts.items() if k > budget)
        total += sum(counts.values())
        if max(counts, default=0) > longest:
            longest, where = max(counts), src.prefix
    if not total:
        return None
    if not over:
        return f"data: all {total:,} captions fit the {budget}-token caption budget"
    return (f"data: {over:,} of {total:,} captions ({over / total:.1%}) are longer than the "
            f"{budget}-token caption budget (model.seq_length {cfg.model.seq_length} - "
            f"{cfg.data.image_tokens_per_sample} image codes - 2) and lose their ends; the "
            f"longest has {longest} tokens ({where})")


def _read_checked_sidecar(prefix: str) -> dict[str, Any]:
    for path in token_files(prefix):  # a .bin/.idx pair or a shard set's manifest
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} not found (data prefix {prefix} in "
                                    f"data.data_path / data.data_paths)")
    sidecar = read_sidecar(prefix)
    if "layout" not in sidecar:
        raise DataFileError(f"{prefix}.vocab.json: no 'layout' entry")
    return sidecar


def _check_same_tokenizers(a: Source, b: Source) -> None:
    """Equal layouts with different tokenizers would still mean different ids for a word."""
    for key in ("text_tokenizer", "image_tokenizer"):
        ida = (a.sidecar.get(key) or {}).get("identity")
        idb = (b.sidecar.get(key) or {}).get("identity")
        if ida and idb and ida != idb:
            raise VocabMismatchError(f"{b.prefix}.vocab.json was written with another {key} "
                                     f"than {a.prefix}.vocab.json (identity {idb[:12]} vs "
                                     f"{ida[:12]}); blended token files need the same one")


def build_datasets(cfg: Config, sources: list[Source], layout: VocabLayout,
                   min_samples: int = 1) -> tuple[Dataset, Dataset]:
    """Train and valid datasets: each prefix split by documents, then blended by weight."""
    trains, valids = [], []
    for src in sources:
        indexed = open_indexed(src.prefix, layout, mine=f"{sources[0].prefix}.vocab.json"
                               if src is not sources[0] else "the training config")
        train_ids, valid_ids, _ = split_documents(len(indexed), cfg.data.split,
                                                  seed=document_split_seed(cfg))
        trains.append(_dataset(cfg, src, indexed, layout, train_ids, training=True))
        valids.append(_dataset(cfg, src, indexed, layout, valid_ids, training=False))
        if len(trains[-1]) < min_samples:
            raise ConfigError(f"data.split={cfg.data.split!r} leaves {len(trains[-1])} train "
                              f"samples in {src.prefix}, fewer than one step of "
                              f"micro_batch_size x DP = {min_samples}")
    weights = [s.weight if s.weight is not None else len(t) for s, t in zip(sources, trains)]
    train = trains[0] if len(trains) == 1 else BlendedDataset(trains, weights, cfg.train.seed)
    kept = [(v, w) for v, w in zip(valids, weights) if len(v)]
    valid = valids[0] if len(valids) == 1 else \
        BlendedDataset(*zip(*kept), seed=cfg.train.seed) if kept else valids[0]
    if cfg.data.valid_data_path:
        valid = _whole_prefix(cfg, cfg.data.valid_data_path, layout)
    if len(valid) < min_samples:
        raise ConfigError(f"data.split={cfg.data.split!r} leaves {len(valid)} valid samples, "
                          f"fewer than one step of micro_batch_size x DP = {min_samples}")
    return train, valid


def _whole_prefix(cfg: Config, prefix: str, layout: VocabLayout) -> Dataset:
    """Every document of `prefix` (data.valid_data_path), checked like the training files."""
    indexed = open_indexed(prefix, layout, mine="data.valid_data_path")
    src = Source(prefix, None, read_sidecar(prefix))
    return _dataset(cfg, src, indexed, layout, np.arange(len(indexed)), training=False)


def document_split_seed(cfg: Config) -> int:
    """The seed of the train/valid/test document split: data.split_seed, else train.seed."""
    return cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed


def _dataset(cfg: Config, src: Source, indexed, layout: VocabLayout, ids,
             training: bool) -> Dataset:
    if src.is_text:
        return PackedTextDataset(indexed, layout, cfg.model.seq_length, ids, seed=cfg.train.seed)
    return T2IDataset(indexed, layout, cfg.model.seq_length, ids,
                      loss_on_captions=cfg.data.loss_on_captions,
                      caption_dropout=cfg.data.caption_dropout if training else 0.0,
                      seed=cfg.train.seed)
