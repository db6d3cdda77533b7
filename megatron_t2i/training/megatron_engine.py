"""Engine `megatron` (the default): megatron-core's DDP, (distributed) optimizer and schedules.

One global batch per step = micro_batch_size x data-parallel size x microbatches.
megatron-core's `get_forward_backward_func` runs the microbatches (no pipelining, 1F1B or
interleaved 1F1B), its DDP reduces gradients (overlapped when configured) and its optimizer
(optionally distributed) steps. Checkpoints are dist_checkpointing's (training/checkpointing.py),
resharded on load to another TP / PP / DP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_t2i.checkpoint.layout import TrainState, parallel_layout
from megatron_t2i.config import Config
from megatron_t2i.model.freeze import FreezePlan, apply_freeze, count_parameters
from megatron_t2i.model.gpt import params_dtype
from megatron_t2i.training import checkpointing
from megatron_t2i.training.engine import build_scheduler
from megatron_t2i.training.forward import forward_backward
from megatron_t2i.vocab import VocabLayout


class MegatronEngine:
    """The project's megatron-core GPT chunks under megatron-core's DDP and optimizer."""

    name = "megatron"
    updates_in_backward = False

    def __init__(self, cfg: Config, chunks: list[torch.nn.Module], layout: VocabLayout,
                 padded_vocab_size: int, num_microbatches: int,
                 device: torch.device | str) -> None:
        self.cfg, self.chunks = cfg, chunks
        self.num_microbatches, self.device = num_microbatches, device
        # before DDP and the optimizer: both skip parameters that need no gradient
        self.freeze: FreezePlan = apply_freeze(chunks, cfg.model.freeze, layout,
                                               padded_vocab_size)
        self.model = wrap_ddp(cfg, chunks)
        config = optimizer_config(cfg)
        self.optimizer = get_megatron_optimizer(
            config, self.model, config_overrides=self.freeze.optimizer_overrides(config))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self._wire_schedule_hooks()

    def _wire_schedule_hooks(self) -> None:
        config = self.chunks[0].config
        no_sync = [m.no_sync for m in self.model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.cfg.parallel.overlap_grad_reduce:
            sync = [m.start_grad_sync for m in self.model]
            config.grad_sync_func = sync[0] if len(sync) == 1 else sync
        config.finalize_model_grads_func = finalize_model_grads

    # ---- the step ------------------------------------------------------------------------
    def forward_backward(self, iterators: list[Iterator]) -> list[dict]:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._schedule(iterators, forward_only=False)
        self.freeze.zero_frozen_row_grads()  # model.freeze=[text_rows]
        return reports

    def non_finite_grads(self) -> bool:
        """Collective: each rank holds other gradient shards, so the flag is all-reduced."""
        bad = torch.zeros(1, dtype=torch.int32, device=self.device)
        for m in self.model:
            for buffer in m.buffers + m.expert_parallel_buffers:
                if not torch.isfinite(buffer.grad_data).all():
                    bad.fill_(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def step(self) -> tuple[bool, float]:
        ok, grad_norm, _ = self.optimizer.step()
        return ok, float(grad_norm) if grad_norm is not None else float("nan")

    def forward_only(self, iterators: list[Iterator], iterations: int) -> list[dict]:
        for m in self.model:
            m.eval()
        reports = []
        for _ in range(iterations):
            reports += self._schedule(iterators, forward_only=True)
        for m in self.model:
            m.train()
        return reports

    def _schedule(self, iterators: list[Iterator], forward_only: bool) -> list[dict]:
        return forward_backward(self.model, iterators, self.num_microbatches,
                                self.cfg.model.seq_length, self.cfg.train.micro_batch_size,
                                forward_only, z_loss_weight=self.cfg.train.z_loss_weight)

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, folder: Path, state: TrainState,
             extras: dict[str, Any] | None) -> dict[str, Any]:
        return checkpointing.write_sharded(folder, state, self.chunks, self.optimizer,
                                           self.scheduler, self.cfg.checkpoint.save_optimizer,
                                           extras)

    def start_save(self, folder: Path, state: TrainState,
                   extras: dict[str, Any] | None) -> tuple[AsyncRequest, dict[str, Any]]:
        """checkpoint.async_save: like `save`, but the tensors are written by the returned
        request once scheduled (training/async_save.py); the trainer publishes afterwards."""
        return checkpointing.start_sharded(folder, state, self.chunks, self.optimizer,
                                           self.scheduler, self.cfg.checkpoint.save_optimizer,
                                           extras)

    def load(self, folder: Path, meta: dict[str, Any],
             extras: dict[str, Any] | None) -> TrainState:
        return checkpointing.load_sharded(folder, meta, self.chunks, self.optimizer,
                                          self.scheduler, extras=extras)

    def parameter_counts(self) -> dict[str, Any]:
        """Each element once whatever the TP / PP layout (a sum over the model-parallel group
        counts TP-replicated norms TP times and a tied output layer twice at PP > 1);
        trainable and frozen apart (model/freeze.py)."""
        return count_parameters(self.chunks, self.freeze,
                                parallel_state.get_model_parallel_group(), self.device)

    def describe(self) -> str:
        p = parallel_layout()
        return (f"world {dist.get_world_size()} = TP {p['tensor_model_parallel_size']} x "
                f"PP {p['pipeline_model_parallel_size']} x DP {p['data_parallel_size']}")


def wrap_ddp(cfg: Config, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def optimizer_config(cfg: Config) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(
        optimizer="adam",  # megatron's "adam" is decoupled weight decay, i.e. AdamW
        lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.train.precision == "bf16",
        params_dtype=params_dtype(cfg),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
