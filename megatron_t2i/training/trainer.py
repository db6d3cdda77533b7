"""The training loop: setup, train_step, evaluate, checkpoint.

    trainer = Trainer(cfg); trainer.setup(); trainer.train()

One global batch per iteration = micro_batch_size x data-parallel size x microbatches.
megatron-core's `get_forward_backward_func` runs the microbatches (no pipelining, 1F1B or
interleaved 1F1B), its DDP reduces gradients (overlapped when configured) and its optimizer
(optionally distributed) steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_t2i.checkpoint import layout
from megatron_t2i.config import Config, save_resolved
from megatron_t2i.data.loader import DataPipeline, build_data_pipeline
from megatron_t2i.distributed import destroy_distributed, init_distributed
from megatron_t2i.model.freeze import FreezePlan, apply_freeze, count_parameters
from megatron_t2i.model.gpt import build_model_chunks, params_dtype
from megatron_t2i.platform import Platform, select_platform
from megatron_t2i.training import checkpointing, ema, faults
from megatron_t2i.training.ema import EMA
from megatron_t2i.training.flops import flops_per_iteration
from megatron_t2i.training.loss import masked_loss, present_losses, reduce_reports
from megatron_t2i.training.loss_plot import write_loss_plot
from megatron_t2i.training.metrics import MetricsLogger, Throughput
from megatron_t2i.training.run_log import PlotError
from megatron_t2i.training.sampling import TrainingSampler
from megatron_t2i.training.zloss import reduce_z_loss, z_loss_func


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_samples = 0
        self.skips_in_a_row = 0  # skipped updates under nan_policy=skip (not resumed)
        self.skips_total = 0
        self._skip_reason = ""
        self._preempted = False

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, build_data: Callable[[Config, Platform], DataPipeline] | None = None) -> None:
        """Platform, process groups, data, model, DDP, optimizer, schedule, resume, sinks.

        `build_data` replaces the token-file pipeline (the throughput benchmark feeds random
        tokens of the config's shapes); it runs after the process groups exist.
        """
        cfg = self.cfg
        # first: a signal during setup is then seen after the first iteration
        self.exit_signals = faults.ExitSignals(cfg.train.exit_signals)
        self.exit_signals.install()
        self.platform: Platform = select_platform(cfg.train.device,
                                                  cfg.parallel.distributed_backend)
        init_distributed(cfg.parallel, self.platform.device_type)
        self._seed(cfg.train.seed)
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.train.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.data: DataPipeline = (build_data or build_data_pipeline)(cfg, self.platform)
        self.padded_vocab_size = self._padded_vocab_size()
        self.chunks = build_model_chunks(cfg, self.padded_vocab_size, self.platform.is_cuda)
        self._build_engine()
        self.scheduler = self._scheduler()
        self.ema = EMA(self.chunks, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self._maybe_resume()
        self.throughput = self._throughput()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.to_dict(),
                                     is_writer=self._is_writer())
        self.sampler = TrainingSampler(cfg, self.data.layout, self.run_dir)
        self._log_startup()

    def _build_engine(self) -> None:
        """megatron-core's DDP around the chunks, its (distributed) optimizer and the schedule
        hooks; the one step the DeepSpeed engine replaces."""
        # before DDP and the optimizer: both skip parameters that need no gradient
        self.freeze: FreezePlan = apply_freeze(self.chunks, self.cfg.model.freeze,
                                               self.data.layout, self.padded_vocab_size)
        self.model = self._wrap_ddp(self.chunks)
        optimizer_config = self._optimizer_config()
        self.optimizer = get_megatron_optimizer(
            optimizer_config, self.model,
            config_overrides=self.freeze.optimizer_overrides(optimizer_config))
        self._wire_schedule_hooks()

    def _seed(self, seed: int) -> None:
        # Same seed on every rank: the model is initialised parallel-invariantly anyway
        # (model/gpt.py); the tracker gives TP ranks distinct dropout streams.
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def _padded_vocab_size(self) -> int:
        """Megatron's padding rule, unless a checkpoint to resume already fixed the size."""
        resume = self._resume_folder() or self._pretrained_folder()
        if resume is not None:
            padded = layout.read_meta(resume)["padded_vocab_size"]
            tp = self.cfg.parallel.tensor_model_parallel_size
            if padded % tp:
                raise layout.CheckpointError(
                    f"checkpoint {resume} has {padded} vocabulary rows, which "
                    f"tensor_model_parallel_size={tp} cannot divide; re-pad it with "
                    f"tools/resize_vocab.py")
            return padded
        return self.data.layout.padded_size(self.cfg.model.make_vocab_size_divisible_by,
                                            self.cfg.parallel.tensor_model_parallel_size)

    def _throughput(self) -> Throughput:
        cfg = self.cfg
        flops = flops_per_iteration(cfg.model, self.padded_vocab_size, cfg.model.seq_length,
                                    cfg.train.global_batch_size,
                                    recompute_full=cfg.train.recompute_granularity == "full")
        return Throughput(tokens_per_iteration=cfg.train.global_batch_size * cfg.model.seq_length,
                          flops_per_iteration=flops, world_size=dist.get_world_size(),
                          peak_tflops_per_gpu=cfg.logging.peak_tflops_per_gpu)

    def _wrap_ddp(self, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
        p = self.cfg.parallel
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

    def _optimizer_config(self) -> OptimizerConfig:
        o = self.cfg.optim
        return OptimizerConfig(
            optimizer="adam",  # megatron's "adam" is decoupled weight decay, i.e. AdamW
            lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=self.cfg.train.precision == "bf16",
            params_dtype=params_dtype(self.cfg),
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
            overlap_param_gather=self.cfg.parallel.overlap_param_gather,
        )

    def _scheduler(self) -> OptimizerParamScheduler:
        o, t = self.cfg.optim, self.cfg.train
        decay_iters = o.lr_decay_iters or t.train_iters
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.lr_warmup_iters else o.lr, max_lr=o.lr,
            min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_iters,
            lr_decay_steps=max(decay_iters, o.lr_warmup_iters + 1),
            lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=t.train_iters, wd_incr_style="constant")

    def _wire_schedule_hooks(self) -> None:
        config = self.chunks[0].config
        no_sync = [m.no_sync for m in self.model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.cfg.parallel.overlap_grad_reduce:
            sync = [m.start_grad_sync for m in self.model]
            config.grad_sync_func = sync[0] if len(sync) == 1 else sync
        config.finalize_model_grads_func = finalize_model_grads

    # ---- resume --------------------------------------------------------------------------
    def _resume_folder(self) -> Path | None:
        if not self.cfg.checkpoint.resume:
            return None
        iteration = layout.read_latest(self.cfg.checkpoint_dir)
        return None if iteration is None else layout.iteration_dir(
            self.cfg.checkpoint_dir, iteration)

    def _pretrained_folder(self) -> Path | None:
        if self.cfg.checkpoint.pretrained is None:
            return None
        return layout.resolve_folder(Path(self.cfg.checkpoint.pretrained))

    def _maybe_resume(self) -> None:
        folder = self._resume_folder()
        if folder is None:
            self._maybe_load_pretrained()
            return
        with_ema = self.ema is not None and layout.read_meta(folder).get("has_ema")
        extras = {ema.KEY: self.ema.sharded_state_dict(self.chunks)} if with_ema else None
        state, _ = checkpointing.load_checkpoint(
            folder, self.chunks, self.optimizer, self.scheduler, self.data.layout,
            self.padded_vocab_size, verify=self.cfg.checkpoint.verify_checksums, extras=extras)
        if with_ema:
            self.ema.load(self.chunks, extras[ema.KEY])
        elif self.ema is not None:  # a checkpoint without an average starts from its weights
            self.ema = EMA(self.chunks, self.ema.decay)
        self.iteration, self.consumed_samples = state.iteration, state.consumed_samples
        self.data.set_consumed_samples(self.consumed_samples)
        self._print(f"resumed from {folder} at iteration {self.iteration} "
                    f"({self.consumed_samples} samples consumed)")

    def _maybe_load_pretrained(self) -> None:
        folder = self._pretrained_folder()
        if folder is None:
            return
        checkpointing.check_architecture(folder, layout.read_meta(folder), self.cfg.model)
        checkpointing.load_model_weights(folder, self.chunks, self.data.layout,
                                         self.padded_vocab_size,
                                         verify=self.cfg.checkpoint.verify_checksums)
        self._print(f"initialised the model from {folder}")

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if self.iteration == 0 and 0 in cfg.train.eval_at:  # the starting point of the curve
            self.metrics.log_eval(0, self.evaluate())
        while self.iteration < cfg.train.train_iters:
            start = time.perf_counter()
            self.data.data_wait.pop()
            report = self.train_step()
            elapsed = time.perf_counter() - start
            self.iteration += 1
            self.consumed_samples += cfg.train.global_batch_size
            last = report
            self._count_skips(report)
            if self.iteration % cfg.train.log_interval == 0:
                self._log_train(report, elapsed)
            self._stop_after_too_many_skips()
            if (cfg.train.eval_interval and self.iteration % cfg.train.eval_interval == 0
                    or self.iteration in cfg.train.eval_at):
                self.metrics.log_eval(self.iteration, self.evaluate())
            if self.sampler.due(self.iteration, final=False):
                self.sample()
            if (cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0
                    or self.iteration in cfg.checkpoint.save_at):
                self.save()
            if cfg.train.exit_interval and self.iteration % cfg.train.exit_interval == 0:
                self._print(f"exit_interval reached at iteration {self.iteration}")
                break
            if signum := self.exit_signals.agreed(self.platform.device()):
                self._stop_on_signal(signum)
        if cfg.checkpoint.save_at_end and not self._saved_at(self.iteration):
            self.save()
        if self.iteration >= cfg.train.train_iters:
            self._end_of_run_pictures()
        return last

    def train_step(self) -> dict[str, float]:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._forward_backward(self.data.train_iterators(), forward_only=False)
        self.freeze.zero_frozen_row_grads()  # model.freeze=[text_rows]
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        out = self._reduce_on_last_stage(reports)  # before the update: a NaN loss skips it
        out["lr"] = lr
        if self._skip_non_finite(out):
            out.update(grad_norm=float("nan"), skipped=1.0)
            return out
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
            if self.ema is not None:
                self.ema.update(self.chunks)
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["skipped"] = 0.0 if ok else 1.0
        return out

    def _skip_non_finite(self, report: dict[str, float]) -> bool:
        """True when this step's loss or gradients hold NaN/Inf and train.nan_policy=skip;
        under `stop` that raises. Checked before the update, which would spread them into
        the parameters; every rank reaches the same verdict."""
        message = (faults.check_loss(report, self.iteration + 1, self.consumed_samples)
                   or self._non_finite_grads())
        if message is None:
            return False
        if self.cfg.train.nan_policy == "stop":
            raise faults.NonFiniteLoss(
                f"{message}; train.nan_policy=stop ended the run: resume from the last "
                f"checkpoint with a lower optim.lr, or set train.nan_policy=skip")
        self._skip_reason = message  # the floor's message repeats the last one
        self._print(f"{message}: update skipped (train.nan_policy=skip)")
        return True

    def _count_skips(self, report: dict[str, float]) -> None:
        """Skipped updates in a row and in all (under nan_policy=skip, added to the report)."""
        if self.cfg.train.nan_policy != "skip":
            return
        skipped = report.get("skipped", 0.0) > 0
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        self.skips_total += int(skipped)
        report.update(skips_in_a_row=self.skips_in_a_row, skips_total=self.skips_total)

    def _stop_after_too_many_skips(self) -> None:
        """The floor under nan_policy=skip: a run that skips every update has diverged."""
        limit = self.cfg.train.max_consecutive_skips
        if self.skips_in_a_row < limit:
            return
        reason = self._skip_reason or f"non-finite values at iteration {self.iteration}"
        raise faults.NonFiniteLoss(
            f"{reason}; {limit} updates in a row were skipped (train.max_consecutive_skips="
            f"{limit}), which ended the run: resume from the last checkpoint with a lower "
            f"optim.lr")

    def _non_finite_grads(self) -> str | None:
        """Collective: each rank holds other gradient shards, so the flag is all-reduced."""
        bad = torch.zeros(1, dtype=torch.int32, device=self.platform.device())
        for m in self.model:
            for buffer in m.buffers + m.expert_parallel_buffers:
                if not torch.isfinite(buffer.grad_data).all():
                    bad.fill_(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return None
        return (f"non-finite gradients at iteration {self.iteration + 1} with a finite loss "
                f"(the batch starts at consumed sample {self.consumed_samples})")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation losses, of the EMA weights when train.ema_decay is set."""
        with self._ema_weights():
            return self._evaluate()

    def _ema_weights(self):
        return self.ema.applied(self.chunks) if self.ema is not None else contextlib.nullcontext()

    def _evaluate(self) -> dict[str, float]:
        for m in self.model:
            m.eval()
        reports = []
        iterators = self.data.valid_iterators()
        for _ in range(self.cfg.train.eval_iters):
            reports += self._forward_backward(iterators, forward_only=True)
        for m in self.model:
            m.train()
        out = self._reduce_on_last_stage(reports)
        return {k: v for k, v in out.items() if not k.endswith("_tokens")}

    def _forward_backward(self, iterators: list[Iterator], forward_only: bool) -> list[dict]:
        t = self.cfg.train
        fwd_bwd = get_forward_backward_func()
        return fwd_bwd(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=self.data.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )

    def _forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        z_weight = self.cfg.train.z_loss_weight
        output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                       attention_mask=None, labels=None if z_weight else batch["labels"])
        if z_weight:  # the model returns vocab-parallel logits; training/zloss.py
            return output, functools.partial(z_loss_func, labels=batch["labels"],
                                             loss_mask=batch["loss_mask"],
                                             modality=batch["modality"], weight=z_weight)
        return output, functools.partial(masked_loss, loss_mask=batch["loss_mask"],
                                         modality=batch["modality"])

    def _reduce_on_last_stage(self, reports: list[dict]) -> dict[str, float]:
        """Loss means over the global batch, broadcast from the last pipeline stage."""
        values = torch.zeros(7, dtype=torch.float64)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            means = reduce_reports(reports, parallel_state.get_data_parallel_group())
            values = torch.tensor([means["loss"], means["loss_text"], means["loss_image"],
                                   means["loss_tokens"], means["loss_text_tokens"],
                                   means["loss_image_tokens"],
                                   reduce_z_loss(reports, parallel_state.get_data_parallel_group())
                                   ], dtype=torch.float64)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            values = values.to(self.platform.device())
            dist.broadcast(values, last, group=parallel_state.get_pipeline_model_parallel_group())
        keys = ("loss", "loss_text", "loss_image", "loss_tokens", "loss_text_tokens",
                "loss_image_tokens", "z_loss")
        out = present_losses(dict(zip(keys, values.cpu().tolist())))
        if not self.cfg.train.z_loss_weight:
            out.pop("z_loss", None)
        return out

    # ---- samples --------------------------------------------------------------------------
    def sample(self) -> dict[str, float] | None:
        """A round of samples of the fixed captions (training/sampling.py)."""
        with self._ema_weights():
            return self.sampler.run(self.chunks[0], self.iteration, self.metrics,
                                    self._is_writer())

    def _end_of_run_pictures(self) -> None:
        if self.sampler.due(self.iteration, final=True):
            self.sample()
        if self._is_writer():
            try:
                self._print(f"loss plot {write_loss_plot(self.run_dir)}")
            except PlotError as e:  # a damaged metrics.jsonl must not fail a finished run
                self._print(f"no loss plot: {e}")

    # ---- logging and saving --------------------------------------------------------------
    def _log_train(self, report: dict[str, float], elapsed: float) -> None:
        scalars = dict(report, consumed_samples=self.consumed_samples)
        scalars.update(self.throughput.scalars(elapsed, self.data.data_wait.pop()))
        if self.platform.is_cuda:
            scalars["memory_gib"] = torch.cuda.memory_allocated() / 2**30
            scalars["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.log(self.iteration, scalars)

    def save(self) -> None:
        meta = {"config": self.cfg.to_dict(), "vocab": self.data.layout.to_dict(),
                "padded_vocab_size": self.padded_vocab_size, "has_ema": self.ema is not None}
        state = layout.TrainState(self.iteration, self.consumed_samples)
        folder = checkpointing.save_checkpoint(
            self.cfg.checkpoint_dir, state, self.chunks, self.optimizer, self.scheduler, meta,
            save_optimizer=self.cfg.checkpoint.save_optimizer,
            extras={ema.KEY: self.ema.sharded_state_dict(self.chunks)} if self.ema else None)
        self._last_save = self.iteration
        self._print(f"saved checkpoint {folder}")

    def _saved_at(self, iteration: int) -> bool:
        return getattr(self, "_last_save", None) == iteration

    def _is_writer(self) -> bool:
        return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)

    def _log_startup(self) -> None:
        # each element once whatever the TP / PP layout (a sum over the model-parallel group
        # counts TP-replicated norms TP times and a tied output layer twice at PP > 1)
        counts = count_parameters(self.chunks, self.freeze,
                                  parallel_state.get_model_parallel_group(),
                                  self.platform.device())
        p = layout.parallel_layout()
        self._print(f"platform {self.platform.device_type}/{self.platform.backend}, "
                    f"world {dist.get_world_size()} = TP {p['tensor_model_parallel_size']} x "
                    f"PP {p['pipeline_model_parallel_size']} x DP {p['data_parallel_size']}; "
                    f"{counts['total']:,} parameters (with embeddings); vocabulary "
                    f"{self.data.layout.size} ids padded to {self.padded_vocab_size}; "
                    f"{self.data.num_microbatches} microbatches per step")
        self._log_parameter_counts(counts)

    def _log_parameter_counts(self, counts: dict[str, Any]) -> None:
        """What trains: printed, and written to <run_dir>/parameters.json."""
        self._print(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} "
                    f"frozen (model.freeze={counts['freeze']})")
        if self.rank == 0:
            (self.run_dir / "parameters.json").write_text(json.dumps(counts, indent=2) + "\n")

    def _print(self, message: str) -> None:
        if self.rank == 0:
            print(f"[megatron_t2i] {message}", flush=True)

    def _stop_on_signal(self, signum: int) -> None:
        """Every rank, after the same iteration: save (a collective), then leave."""
        name = faults.signal_name(signum)
        self._print(f"{name} received: saving at iteration {self.iteration} and stopping")
        if not self._saved_at(self.iteration):
            self.save()
        self._preempted = True
        raise faults.Preempted(name, self.iteration)

    def close(self) -> None:
        self.metrics.close()
        destroy_distributed()
        # last: a launcher's SIGTERM to the other ranks after a preemption must not cut
        # their sinks short; after a preemption never: that SIGTERM may come while the
        # interpreter exits, and must leave this rank's 75 alone (training/faults.py)
        if self._preempted:
            self.exit_signals.ignore()
        else:
            self.exit_signals.restore()


def run(cfg: Config) -> dict[str, Any]:
    """Train with the engine the config names (train.engine)."""
    if cfg.train.engine == "deepspeed":
        from megatron_t2i.training.deepspeed_engine import DeepSpeedTrainer

        trainer: Trainer = DeepSpeedTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.close()
