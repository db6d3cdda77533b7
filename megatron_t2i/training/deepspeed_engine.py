"""Engine `deepspeed`: the project's megatron-core GPT at TP = PP = 1 under DeepSpeed ZeRO.

    python -m megatron_t2i.train --config FILE train.engine=deepspeed deepspeed.zero_stage=3

Everything around the step is the trainer's (training/trainer.py, through the engine protocol
of training/engine.py): the run directory, the data pipeline and its resumable position, the
loop with its log / eval / save / exit cadence, the NaN policy, the metrics and their names,
the checkpoint layout and `latest`. What differs from the megatron engine:

- the model: built by model/gpt.py (the same seed gives the same weights), handed bare (no
  megatron DDP) to `deepspeed.initialize` with a config generated from ours
  (`config.deepspeed_config`);
- the optimizer: torch AdamW over megatron-core's parameter-group rule (no weight decay for
  biases and 1-D parameters), and the learning rate from megatron-core's
  OptimizerParamScheduler, as in the megatron engine, so the schedules cannot disagree;
- the loss: each microbatch's masked loss *sum* is scaled by DP / (loss tokens of the global
  batch). DeepSpeed averages gradients over DP, so the step's gradient is that of the mean over
  every loss token of the global batch: megatron's `calculate_per_token_loss`;
- checkpoints: DeepSpeed's own files (ZeRO partitions) in `<checkpoint dir>/iter_N/` with our
  meta.json, written into `iter_N.tmp/` and published by the trainer as for the megatron
  engine; iteration, consumed samples, LR schedule and RNG states travel in DeepSpeed's
  client_state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

from megatron_t2i.checkpoint.layout import CheckpointError, TrainState
from megatron_t2i.config import Config, OptimConfig, deepspeed_config
from megatron_t2i.platform import Platform
from megatron_t2i.training import checkpointing
from megatron_t2i.training.engine import build_scheduler
from megatron_t2i.training.forward import forward_step


class DeepSpeedEngine:
    """The bare model under deepspeed.initialize (TP = PP = 1, so DP = world)."""

    name = "deepspeed"
    updates_in_backward = True  # engine.step() applies the update after the last microbatch

    def __init__(self, cfg: Config, chunks: list[torch.nn.Module], platform: Platform,
                 num_microbatches: int) -> None:
        self.cfg, self.chunks, self.num_microbatches = cfg, chunks, num_microbatches
        self.n_parameters = sum(p.numel() for p in chunks[0].parameters())  # before ZeRO-3
        self.engine = _initialize_deepspeed(cfg, chunks[0], platform)
        self.optimizer = self.engine.optimizer  # the ZeRO optimizer; its param_groups: AdamW's
        self.scheduler = build_scheduler(cfg, self.optimizer)

    # ---- the step ------------------------------------------------------------------------
    def forward_backward(self, iterators: list[Iterator]) -> list[dict]:
        """Each microbatch's loss sum scaled by DP / (loss tokens of the global batch);
        DeepSpeed steps the optimizer after the last one."""
        iterator = iterators[0]
        batches = [next(iterator) for _ in range(self.num_microbatches)]
        scale = dist.get_world_size() / _global_loss_tokens(batches)
        reports = []
        for batch in batches:
            total, _, report = self._microbatch_loss(batch)
            self.engine.backward(total * scale, scale_wrt_gas=False)
            self.engine.step()
            reports.append(report)
        return reports

    def non_finite_grads(self) -> bool:
        return False  # the update is already applied: the trainer checks the gradient norm

    def step(self) -> tuple[bool, float]:
        ok = self.engine.was_step_applied()  # False only on an fp16 overflow
        grad_norm = self.engine.get_global_grad_norm()
        return ok, float(grad_norm) if grad_norm is not None else float("nan")

    def forward_only(self, iterators: list[Iterator], iterations: int) -> list[dict]:
        self.engine.eval()
        iterator = iterators[0]
        reports = [self._microbatch_loss(next(iterator))[2]
                   for _ in range(iterations * self.num_microbatches)]
        self.engine.train()
        return reports

    def _microbatch_loss(self, batch: dict[str, torch.Tensor]) -> tuple:
        output, loss_func = forward_step(iter([batch]), self.engine)
        return loss_func(output)

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, folder: Path, state: TrainState,
             extras: dict[str, Any] | None) -> dict[str, Any]:
        client = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                  "opt_param_scheduler": self.scheduler.state_dict(),
                  "rng_state": checkpointing.rng_state()}
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client,
                                    save_latest=False)
        return {"has_optimizer": True, "engine": self.name,
                "zero_stage": self.cfg.deepspeed.zero_stage}

    def load(self, folder: Path, meta: dict[str, Any],
             extras: dict[str, Any] | None) -> TrainState:
        _check_same_sharding(folder, meta, self.cfg.deepspeed.zero_stage)
        _, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not read it")
        self.scheduler.load_state_dict(client["opt_param_scheduler"])
        checkpointing.restore_rng(client["rng_state"])
        return TrainState(client["iteration"], client["consumed_samples"])

    def parameter_counts(self) -> dict[str, Any]:
        return {"total": self.n_parameters}

    def describe(self) -> str:
        ds = self.cfg.deepspeed
        offload = " with the optimizer offloaded to the CPU" if ds.offload_optimizer else ""
        return (f"world {dist.get_world_size()} = DP {dist.get_world_size()}, DeepSpeed "
                f"ZeRO stage {ds.zero_stage}{offload}")


def _initialize_deepspeed(cfg: Config, model: torch.nn.Module, platform: Platform):
    # DeepSpeed picks its accelerator once, at import: the platform's, not its own guess
    os.environ.setdefault("DS_ACCELERATOR", platform.device_type)
    import deepspeed

    if not platform.is_cuda:
        _skip_cpu_shm_comm_op()
    config = deepspeed_config(cfg, dist.get_world_size(), platform.is_cuda)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model, cfg.optim),
                                           config=config, dist_init_required=False)
    return engine


def _global_loss_tokens(batches: list[dict[str, torch.Tensor]]) -> float:
    """Loss tokens of the whole global batch (all microbatches, all DP ranks)."""
    count = sum(b["loss_mask"].sum() for b in batches).to(torch.float64).reshape(1)
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return max(count.item(), 1.0)


def adamw(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW (what megatron-core runs without TE / apex) over the megatron engine's
    parameter groups. The scheduler sets each group's lr and weight decay (x wd_mult)."""
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr,
                             betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                             weight_decay=optim.weight_decay)


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """megatron-core's standard rule (get_standard_config_overrides): biases and 1-D
    parameters (norms) get no weight decay."""
    rules = get_standard_config_overrides(OptimizerConfig(lr=optim.lr, min_lr=optim.min_lr,
                                                          weight_decay=optim.weight_decay))
    no_decay_keys = [key for key, override in rules.items() if override.get("wd_mult") == 0.0]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = any(key.matches(param, name) for key in no_decay_keys)
            (no_decay if skip else decay).append(param)
    limits = {"max_lr": optim.lr, "min_lr": optim.min_lr}
    groups = [{"params": decay, "wd_mult": 1.0, **limits},
              {"params": no_decay, "wd_mult": 0.0, **limits}]
    return [g for g in groups if g["params"]]


def _check_same_sharding(folder: Path, meta: dict[str, Any], zero_stage: int) -> None:
    saved_dp = meta.get("parallel", {}).get("data_parallel_size")
    saved_stage = meta.get("zero_stage")
    dp = parallel_state.get_data_parallel_world_size()
    if (saved_dp, saved_stage) != (dp, zero_stage):
        raise CheckpointError(
            f"checkpoint {folder} holds ZeRO stage {saved_stage} partitions for "
            f"{saved_dp} data-parallel ranks; this run has stage {zero_stage} on {dp}: resume "
            f"with the same deepspeed.zero_stage and number of processes")


def _skip_cpu_shm_comm_op() -> None:
    """On the CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce
    (about 35 s, with g++ and ninja) that only its inference all-reduce uses; training's
    collectives go through torch.distributed (gloo). Marking the op incompatible skips the
    build (`build_shm_op` checks this table)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


