"""The seam between the training loop and what runs a step: an engine.

    engine = MegatronEngine(runtime, chunks, layout, padded)   # training/megatron_engine.py
    engine = DeepSpeedEngine(runtime, chunks, padded)           # training/deepspeed_engine.py

The trainer (training/trainer.py) holds one engine and owns the loop, the signals, the
metrics, the NaN / skip policy and the schedule of saves and evaluations. An engine owns the
wrapped model, the optimizer and the LR schedule, and supplies:

- `forward_backward(iterators)`: one global batch forward and backward (the microbatch loss
  reports of training/loss.py, on the last pipeline stage);
- `non_finite_grads()` (before the update) and `step()` (the update: applied?, grad norm);
- `forward_only(iterators, iterations)`: validation reports, in eval mode;
- `save(folder, state, extras)` / `load(folder, meta, extras)`: its state, in its format,
  inside a checkpoint folder whose layout, meta.json and publication are the trainer's
  (checkpoint/layout.py `publish_checkpoint`). The megatron engine also has
  `start_save(folder, state, extras)` for `checkpoint.async_save` (training/async_save.py);
  config validation refuses that option with DeepSpeed.

Neither engine imports the trainer; the trainer knows them only through this protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_t2i.checkpoint.layout import TrainState
from megatron_t2i.config import Config


class Engine(Protocol):
    name: str  # "megatron" or "deepspeed": recorded in meta.json, checked on resume
    chunks: list[torch.nn.Module]  # the bare model chunks (sampling, EMA)
    optimizer: Any
    scheduler: OptimizerParamScheduler
    # True when the update happens inside forward_backward (DeepSpeed): no skip is possible
    updates_in_backward: bool

    def forward_backward(self, iterators: list[Iterator]) -> list[dict]: ...

    def non_finite_grads(self) -> bool: ...

    def step(self) -> tuple[bool, float]: ...

    def forward_only(self, iterators: list[Iterator], iterations: int) -> list[dict]: ...

    def save(self, folder: Path, state: TrainState,
             extras: dict[str, Any] | None) -> dict[str, Any]: ...

    def load(self, folder: Path, meta: dict[str, Any],
             extras: dict[str, Any] | None) -> TrainState: ...

    def parameter_counts(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...  # the parallel layout, for the startup line


def build_scheduler(cfg: Config, optimizer: Any) -> OptimizerParamScheduler:
    """megatron-core's LR (warmup, decay) and weight-decay schedule over the engine's
    optimizer: one schedule for both engines, so they cannot disagree."""
    o, t = cfg.optim, cfg.train
    decay_iters = o.lr_decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.lr_warmup_iters else o.lr, max_lr=o.lr,
        min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, o.lr_warmup_iters + 1),
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=t.train_iters, wd_incr_style="constant")

