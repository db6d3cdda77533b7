"""Engine `deepspeed`: the project's megatron-core GPT at TP = PP = 1 under DeepSpeed ZeRO.

    python -m megatron_t2i.train --config FILE train.engine=deepspeed deepspeed.zero_stage=3

Everything around the step is the megatron engine's (`Trainer`): the run directory, the data
pipeline and its resumable position, the loop with its log / eval / save / exit cadence, the
metrics and their names, the meaning of `latest`. What differs:

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
  meta.json, written into `iter_N.tmp/` and published (renamed, then `latest`) as the megatron
  engine does; iteration, consumed samples, LR schedule and RNG states travel in DeepSpeed's
  client_state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

from megatron_t2i.checkpoint import layout
from megatron_t2i.checkpoint.trust import check_before_load
from megatron_t2i.config import OptimConfig, deepspeed_config
from megatron_t2i.training import checkpointing, faults
from megatron_t2i.training.loss import masked_loss
from megatron_t2i.training.trainer import Trainer

ENGINE = "deepspeed"


class DeepSpeedTrainer(Trainer):
    """The megatron engine's loop; setup, step, evaluation and checkpoints through DeepSpeed."""

    # ---- setup ---------------------------------------------------------------------------
    def _build_engine(self) -> None:
        """deepspeed.initialize in place of megatron's DDP and optimizer (TP = PP = 1, so
        DP = world). A pretrained init goes into the bare model first: ZeRO-3 partitions the
        parameters when it wraps them."""
        self.n_parameters = sum(p.numel() for p in self.chunks[0].parameters())
        if self._resume_folder() is None:
            self._maybe_load_pretrained()  # a megatron checkpoint, into the bare model
        self.engine = self._initialize_deepspeed(self.chunks[0])
        self.optimizer = self.engine.optimizer  # the ZeRO optimizer; its param_groups are AdamW's

    def _initialize_deepspeed(self, model: torch.nn.Module):
        # DeepSpeed picks its accelerator once, at import: the platform's, not its own guess
        os.environ.setdefault("DS_ACCELERATOR", self.platform.device_type)
        import deepspeed

        if not self.platform.is_cuda:
            _skip_cpu_shm_comm_op()
        config = deepspeed_config(self.cfg, dist.get_world_size(), self.platform.is_cuda)
        optimizer = adamw(model, self.cfg.optim)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        return engine

    # ---- resume --------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        folder = self._resume_folder()
        if folder is None:
            return
        # files whole and every pickle validated: DeepSpeed unpickles with weights_only=False
        check_before_load(folder, self.cfg.checkpoint.verify_checksums, dcp=False)
        meta = layout.read_meta(folder)
        checkpointing.check_engine(folder, meta, ENGINE)
        checkpointing.check_vocab(folder, meta, self.data.layout, self.padded_vocab_size)
        _check_same_sharding(folder, meta, self.cfg.deepspeed.zero_stage)
        _, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise layout.CheckpointError(f"{folder}: DeepSpeed could not read it")
        self.scheduler.load_state_dict(client["opt_param_scheduler"])
        checkpointing.restore_rng(client["rng_state"])
        self.iteration, self.consumed_samples = client["iteration"], client["consumed_samples"]
        self.data.set_consumed_samples(self.consumed_samples)
        self._print(f"resumed from {folder} at iteration {self.iteration} "
                    f"({self.consumed_samples} samples consumed)")

    # ---- the step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        iterator = self.data.train_iterators()[0]
        batches = [next(iterator) for _ in range(self.data.num_microbatches)]
        scale = dist.get_world_size() / self._global_loss_tokens(batches)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        reports = []
        for batch in batches:  # DeepSpeed steps the optimizer after the last microbatch
            total, _, report = self._microbatch_loss(batch)
            self.engine.backward(total * scale, scale_wrt_gas=False)
            self.engine.step()
            reports.append(report)
        ok = self.engine.was_step_applied()  # False only on an fp16 overflow
        if ok:
            self.scheduler.step(increment=1)
        out = self._reduce_on_last_stage(reports)
        grad_norm = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        self._stop_if_non_finite(out)
        out["lr"] = lr
        out["skipped"] = 0.0 if ok else 1.0
        return out

    def _stop_if_non_finite(self, report: dict[str, float]) -> None:
        """train.nan_policy=stop (the only policy here: DeepSpeed updates inside step()):
        end the run before anything is saved, so `latest` stays on the last good checkpoint."""
        message = faults.check_loss(report, self.iteration + 1, self.consumed_samples)
        if message is None and not math.isfinite(report["grad_norm"]) and report["skipped"] == 0:
            message = (f"non-finite gradient norm at iteration {self.iteration + 1} (the batch "
                       f"starts at consumed sample {self.consumed_samples})")
        if message is not None:
            raise faults.NonFiniteLoss(f"{message}; train.nan_policy=stop ended the run: resume "
                                       f"from the last checkpoint with a lower optim.lr")

    def _global_loss_tokens(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Loss tokens of the whole global batch (all microbatches, all DP ranks)."""
        count = sum(b["loss_mask"].sum() for b in batches).to(torch.float64).reshape(1)
        dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
        return max(count.item(), 1.0)

    def _microbatch_loss(self, batch: dict[str, torch.Tensor]):
        per_token = self.engine(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                                attention_mask=None, labels=batch["labels"])
        return masked_loss(per_token, loss_mask=batch["loss_mask"], modality=batch["modality"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        iterator = self.data.valid_iterators()[0]
        reports = [self._microbatch_loss(next(iterator))[2]
                   for _ in range(self.cfg.train.eval_iters * self.data.num_microbatches)]
        self.engine.train()
        out = self._reduce_on_last_stage(reports)
        return {k: v for k, v in out.items() if not k.endswith("_tokens")}

    # ---- saving --------------------------------------------------------------------------
    def save(self) -> None:
        root = self.cfg.checkpoint_dir
        state = layout.TrainState(self.iteration, self.consumed_samples)
        tmp = layout.begin_save(root, self.iteration)
        client = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                  "opt_param_scheduler": self.scheduler.state_dict(),
                  "rng_state": checkpointing.rng_state()}
        try:
            self.engine.save_checkpoint(str(root), tag=tmp.name, client_state=client,
                                        save_latest=False)
        except Exception as e:
            full = layout.disk_full_error(e, tmp, root)
            if full is None:
                raise
            raise full from None
        meta = {"config": self.cfg.to_dict(), "vocab": self.data.layout.to_dict(),
                "padded_vocab_size": self.padded_vocab_size, "has_optimizer": True,
                "engine": ENGINE, "zero_stage": self.cfg.deepspeed.zero_stage}
        folder = layout.publish_save(root, state, meta)
        self._last_save = self.iteration
        self._print(f"saved checkpoint {folder}")

    def _log_startup(self) -> None:
        ds = self.cfg.deepspeed
        self._print(f"platform {self.platform.device_type}/{self.platform.backend}, "
                    f"world {dist.get_world_size()} = DP {dist.get_world_size()}, DeepSpeed "
                    f"ZeRO stage {ds.zero_stage}"
                    f"{' with the optimizer offloaded to the CPU' if ds.offload_optimizer else ''}"
                    f"; {self.n_parameters:,} parameters (with embeddings); vocabulary "
                    f"{self.data.layout.size} ids padded to {self.padded_vocab_size}; "
                    f"{self.data.num_microbatches} microbatches per step")


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
        raise layout.CheckpointError(
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


