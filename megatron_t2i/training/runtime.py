"""One build of the runtime that training, the evaluation tools and the benchmarks share.

    runtime = start_runtime(cfg)                      # platform, process groups, seed
    padded = padded_vocab_size(cfg, layout, folder)    # Megatron's rule, or the checkpoint's
    chunks = runtime.build_model(padded)               # this rank's megatron-core GPT chunks

The trainer builds its data pipeline between the first and the second step (it needs the
process groups and gives the vocabulary layout); evaluation reads the layout from a
checkpoint's meta.json instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_t2i.checkpoint.layout import CheckpointError, read_meta
from megatron_t2i.config import Config
from megatron_t2i.distributed import init_distributed
from megatron_t2i.model.gpt import build_model_chunks
from megatron_t2i.platform import Platform, select_platform
from megatron_t2i.vocab import VocabLayout


@dataclass
class Runtime:
    """What every rank runs on once the process groups exist."""

    cfg: Config
    platform: Platform

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def device(self) -> torch.device:
        return self.platform.device()

    def build_model(self, padded_vocab_size: int) -> list[torch.nn.Module]:
        """This rank's model chunks (model/gpt.py), initialised from the seed set at start."""
        return build_model_chunks(self.cfg, padded_vocab_size, self.platform.is_cuda)


def start_runtime(cfg: Config) -> Runtime:
    """The platform (CUDA/NCCL or CPU/gloo), the process groups (unless a tool started them
    already) and the seed."""
    platform = select_platform(cfg.train.device, cfg.parallel.distributed_backend)
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(cfg.parallel, platform.device_type)
    seed(cfg.train.seed)
    return Runtime(cfg, platform)


def seed(value: int) -> None:
    # Same seed on every rank: the model is initialised parallel-invariantly anyway
    # (model/gpt.py); the tracker gives TP ranks distinct dropout streams.
    torch.manual_seed(value)
    tensor_parallel.model_parallel_cuda_manual_seed(value)


def padded_vocab_size(cfg: Config, layout: VocabLayout, checkpoint: Path | None = None) -> int:
    """Megatron's padding rule (make_vocab_size_divisible_by x TP), unless a checkpoint to
    load already fixed the size, which this run's TP must then divide."""
    tp = cfg.parallel.tensor_model_parallel_size
    if checkpoint is None:
        return layout.padded_size(cfg.model.make_vocab_size_divisible_by, tp)
    padded = int(read_meta(checkpoint)["padded_vocab_size"])
    if padded % tp:
        raise CheckpointError(
            f"checkpoint {checkpoint} has {padded} vocabulary rows, which "
            f"tensor_model_parallel_size={tp} cannot divide; re-pad it with "
            f"tools/resize_vocab.py")
    return padded
