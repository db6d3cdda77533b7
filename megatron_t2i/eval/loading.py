"""Load any checkpoint for evaluation, at this process's own TP / PP.

    cfg, chunks, layout, padded_vocab = load_for_eval("runs/demo/checkpoints", tp=2)

The checkpoint's meta.json holds the config it was trained with; its `parallel` section is
replaced by the evaluation's (TP, PP, no virtual pipeline, data parallel = the rest of the
world), the runtime (platform, process groups, seed) and the model are built by the trainer's
own code (training/runtime.py) and the weights are read with dist_checkpointing, which
reshards them to the evaluation's layout (the EMA weights when the run kept them,
train.ema_decay). Run several processes under torchrun; one process needs no launcher.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_t2i.checkpoint.layout import read_meta, resolve_folder
from megatron_t2i.checkpoint.trust import check_before_load
from megatron_t2i.config import (
    Config,
    ConfigError,
    config_from_dict,
    validate,
    world_size_from_env,
)
from megatron_t2i.distributed import destroy_distributed
from megatron_t2i.platform import Platform, select_platform
from megatron_t2i.tokenizers.image import ImageTokenizer
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.training import checkpointing
from megatron_t2i.training.ema import load_averaged_weights
from megatron_t2i.training.runtime import padded_vocab_size, start_runtime
from megatron_t2i.vocab import VocabLayout


def eval_config(meta: dict[str, Any], tp: int, pp: int, device: str = "auto") -> Config:
    """The checkpoint's config with the evaluation's parallel layout and device."""
    cfg = config_from_dict(meta["config"], source="checkpoint meta.json")
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.virtual_pipeline_model_parallel_size = None
    p.use_distributed_optimizer = p.overlap_grad_reduce = p.overlap_param_gather = False
    p.sequence_parallel = False
    cfg.train.device = device
    cfg.train.fp8 = None
    cfg.train.recompute_granularity = None
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    if world % (tp * pp):
        raise ConfigError(f"cannot evaluate at TP={tp} x PP={pp} with {world} processes: "
                          f"the number of processes must be a multiple of TP x PP")
    # evaluation has no global batch: one microbatch per data-parallel rank passes the checks
    cfg.train.global_batch_size = cfg.train.micro_batch_size * world // (tp * pp)
    validate(cfg, world)
    return cfg


def load_for_eval(checkpoint_path: str | Path, tp: int = 1, pp: int = 1, device: str = "auto",
                  ) -> tuple[Config, list[torch.nn.Module], VocabLayout, int]:
    """Start the process groups (if not yet), build this rank's model chunks and load the
    checkpoint's model weights into them, resharded. Returns (config, chunks in eval mode,
    vocabulary layout, padded vocabulary size)."""
    folder = resolve_folder(Path(checkpoint_path))
    check_before_load(folder)  # before any process group or model exists
    meta = read_meta(folder)
    checkpointing.check_engine(folder, meta, "megatron")
    cfg = eval_config(meta, tp, pp, device)
    layout = VocabLayout.from_dict(meta["vocab"])
    padded = padded_vocab_size(cfg, layout, folder)  # the checkpoint's, checked against TP
    runtime = start_runtime(cfg)  # the trainer's: platform, process groups, seed
    chunks = runtime.build_model(padded)
    checkpointing.load_model_weights(folder, chunks, layout, padded, verify=False)  # hashed
    if meta.get("has_ema"):  # train.ema_decay: evaluate and sample the averaged weights
        load_averaged_weights(folder, chunks)
    for chunk in chunks:
        chunk.eval()
    return cfg, chunks, layout, padded


def eval_platform(cfg: Config) -> Platform:
    return select_platform(cfg.train.device, cfg.parallel.distributed_backend)


def close() -> None:
    """Tear the process groups down (end of a tool)."""
    destroy_distributed()


def is_writer() -> bool:
    """Rank 0 writes the reports and images (also after close(), from the launcher's RANK)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def text_tokenizer_for(cfg: Config, path: str | Path | None = None) -> TextTokenizer:
    """The given tokenizer (sentencepiece .model or HF tokenizer.json), else the run's: the
    demo corpus's (data.data_path unset) or the one its token files' sidecar records."""
    from megatron_t2i.tokenizers import factory

    if path is not None:
        return factory.load_text_tokenizer("auto", path)
    if data_prefix(cfg) is None:
        return _demo_tokenizers(cfg)[0]
    entry = _sidecar_entry(cfg, "text_tokenizer")
    return factory.load_text_tokenizer(entry["kind"], _recorded_path(entry, cfg))


def image_tokenizer_for(cfg: Config, kind: str | None = None,
                        path: str | Path | None = None) -> ImageTokenizer:
    """The given image tokenizer (kind 'kmeans' for a KMeansPatchVQ .npz, 'vqvae' for a
    .safetensors with a .json beside it, 'movqgan'), else the run's, as for
    text_tokenizer_for."""
    from megatron_t2i.tokenizers import factory

    if path is not None:
        return factory.load_image_tokenizer(kind or _image_kind(Path(path)), path)
    if data_prefix(cfg) is None:
        return _demo_tokenizers(cfg)[1]
    entry = _sidecar_entry(cfg, "image_tokenizer")
    return factory.load_image_tokenizer(_image_kind_name(entry["kind"]),
                                        _recorded_path(entry, cfg))


def _image_kind(path: Path) -> str:
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return "vqvae"  # tokenizers/vqvae.py keeps its config beside the weights
    return "kmeans" if path.suffix == ".npz" else "movqgan"


def _image_kind_name(recorded: str) -> str:
    return "kmeans" if recorded == "kmeans_patch_vq" else recorded


def _demo_tokenizers(cfg: Config) -> tuple[TextTokenizer, ImageTokenizer]:
    from megatron_t2i.data.demo import prepare_demo_corpus

    _, _, text, image = prepare_demo_corpus(cfg.data, cfg.train.seed)
    return text, image


def _sidecar_entry(cfg: Config, key: str) -> dict[str, Any]:
    from megatron_t2i.data.indexed import read_sidecar

    entry = read_sidecar(data_prefix(cfg)).get(key)
    if entry is None:
        flag = "--text-tokenizer" if key == "text_tokenizer" else "--image-tokenizer"
        raise FileNotFoundError(f"{data_prefix(cfg)}.vocab.json records no {key}: pass "
                                f"its path ({flag})")
    return entry


def _recorded_path(entry: dict[str, Any], cfg: Config) -> Path:
    """As recorded, or relative to the token files' folder."""
    path = Path(entry.get("path") or entry["file"])
    if path.is_absolute() or path.exists():
        return path
    return Path(data_prefix(cfg)).parent / path


def data_prefix(cfg: Config) -> str | None:
    """The run's (first) token-file prefix; None for the demo corpus. Every prefix of a blend
    shares one vocabulary layout and so one pair of tokenizers."""
    return cfg.data.data_path or (cfg.data.data_paths[0] if cfg.data.data_paths else None)
