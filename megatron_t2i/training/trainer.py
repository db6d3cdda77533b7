"""The training loop: the schedule of steps, evaluations, samples and saves, around an engine.

    trainer = Trainer(cfg); trainer.setup(); trainer.train()

The trainer builds the runtime (training/runtime.py: platform, process groups, seed, model),
the data pipeline and one engine (training/engine.py: megatron-core's, or DeepSpeed's). It owns
the loop, the exit signals, the metrics, the NaN / skip policy (train.nan_policy), the EMA of
the weights, resume and the schedule of evaluations and saves; the engine runs the steps and
reads and writes its own state inside the checkpoint folders that checkpoint/layout.py begins
and publishes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_t2i.checkpoint import layout
from megatron_t2i.config import Config, save_resolved
from megatron_t2i.data.loader import DataPipeline, build_data_pipeline
from megatron_t2i.distributed import destroy_distributed
from megatron_t2i.platform import Platform
from megatron_t2i.training import checkpointing, ema, faults
from megatron_t2i.training.async_save import PendingSaves
from megatron_t2i.training.ema import EMA
from megatron_t2i.training.engine import Engine
from megatron_t2i.training.flops import flops_per_iteration
from megatron_t2i.training.loss import present_losses, reduce_on_last_stage
from megatron_t2i.training.loss_plot import write_loss_plot
from megatron_t2i.training.metrics import MetricsLogger, Throughput
from megatron_t2i.training.run_log import PlotError
from megatron_t2i.training.runtime import padded_vocab_size, start_runtime
from megatron_t2i.training.sampling import TrainingSampler


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.iteration = 0
        self.consumed_samples = 0
        self.skips_in_a_row = 0  # skipped updates under nan_policy=skip (not resumed)
        self.skips_total = 0
        self._skip_reason = ""
        self._preempted = False
        self._last_save: int | None = None
        self.pending_saves = PendingSaves()  # checkpoint.async_save (training/async_save.py)

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, build_data: Callable[[Config, Platform], DataPipeline] | None = None) -> None:
        """Runtime, data, model, engine, resume, sinks.

        `build_data` replaces the token-file pipeline (the throughput benchmark feeds random
        tokens of the config's shapes); it runs after the process groups exist.
        """
        cfg = self.cfg
        # first: a signal during setup is then seen after the first iteration
        self.exit_signals = faults.ExitSignals(cfg.train.exit_signals)
        self.exit_signals.install()
        self.runtime = start_runtime(cfg)
        self.platform: Platform = self.runtime.platform
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.train.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.data: DataPipeline = (build_data or build_data_pipeline)(cfg, self.platform)
        resume = self._resume_folder()
        pretrained = None if resume is not None else self._pretrained_folder()
        self.padded_vocab_size = padded_vocab_size(cfg, self.data.layout, resume or pretrained)
        chunks = self.runtime.build_model(self.padded_vocab_size)
        if pretrained is not None:  # into the bare model: ZeRO-3 partitions it when wrapped
            self._load_pretrained(pretrained, chunks)
        self.engine: Engine = build_engine(cfg, chunks, self.data, self.padded_vocab_size,
                                           self.platform)
        self.ema = EMA(chunks, cfg.train.ema_decay) if cfg.train.ema_decay else None
        if resume is not None:
            self._resume(resume)
        self.throughput = self._throughput()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.to_dict(),
                                     is_writer=self._is_writer())
        self.sampler = TrainingSampler(cfg, self.data.layout, self.run_dir)
        self._log_startup()

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return self.engine.chunks

    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    @property
    def scheduler(self) -> Any:
        return self.engine.scheduler

    def _throughput(self) -> Throughput:
        cfg = self.cfg
        flops = flops_per_iteration(cfg.model, self.padded_vocab_size, cfg.model.seq_length,
                                    cfg.train.global_batch_size,
                                    recompute_full=cfg.train.recompute_granularity == "full")
        return Throughput(tokens_per_iteration=cfg.train.global_batch_size * cfg.model.seq_length,
                          flops_per_iteration=flops, world_size=dist.get_world_size(),
                          peak_tflops_per_gpu=cfg.logging.peak_tflops_per_gpu)

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

    def _resume(self, folder: Path) -> None:
        """The engine's state (model, optimizer, schedule, RNG), the EMA and the data position
        of the newest complete checkpoint, after the checks every engine shares."""
        meta = checkpointing.check_checkpoint(folder, self.data.layout, self.padded_vocab_size,
                                              self.cfg.checkpoint.verify_checksums,
                                              engine=self.engine.name)
        with_ema = self.ema is not None and meta.get("has_ema")
        extras = {ema.KEY: self.ema.sharded_state_dict(self.chunks)} if with_ema else None
        state = self.engine.load(folder, meta, extras)
        if with_ema:
            self.ema.load(self.chunks, extras[ema.KEY])
        elif self.ema is not None:  # a checkpoint without an average starts from its weights
            self.ema = EMA(self.chunks, self.ema.decay)
        self.iteration, self.consumed_samples = state.iteration, state.consumed_samples
        self.data.set_consumed_samples(self.consumed_samples)
        self._print(f"resumed from {folder} at iteration {self.iteration} "
                    f"({self.consumed_samples} samples consumed)")

    def _load_pretrained(self, folder: Path, chunks: list[torch.nn.Module]) -> None:
        """checkpoint.pretrained: a megatron-engine checkpoint's weights (any TP / PP)."""
        checkpointing.check_architecture(folder, layout.read_meta(folder), self.cfg.model)
        checkpointing.load_model_weights(folder, chunks, self.data.layout,
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
            self.publish_finished_saves(wait=False)
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
        self.publish_finished_saves(wait=True)
        if self.iteration >= cfg.train.train_iters:
            self._end_of_run_pictures()
        return last

    def train_step(self) -> dict[str, float]:
        """One global batch: the engine's forward and backward, then (unless the NaN policy
        skips it) the update, the LR schedule and the EMA."""
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        out = self._reduce(self.engine.forward_backward(self.data.train_iterators()))
        out["lr"] = lr
        if self._skip_non_finite(out):  # before the update, which would spread them
            out.update(grad_norm=float("nan"), skipped=1.0)
            return out
        ok, grad_norm = self.engine.step()
        if ok:
            self.scheduler.step(increment=1)
            if self.ema is not None:
                self.ema.update(self.chunks)
        out["grad_norm"] = grad_norm
        out["skipped"] = 0.0 if ok else 1.0
        if ok and self.engine.updates_in_backward and not math.isfinite(grad_norm):
            self._stop(f"non-finite gradient norm at iteration {self.iteration + 1} (the batch "
                       f"starts at consumed sample {self.consumed_samples})", skip_hint=False)
        return out

    def _skip_non_finite(self, report: dict[str, float]) -> bool:
        """True when this step's loss or gradients hold NaN/Inf and train.nan_policy=skip;
        under `stop` that raises. Every rank reaches the same verdict (the losses are reduced,
        the gradient flag all-reduced)."""
        message = (faults.check_loss(report, self.iteration + 1, self.consumed_samples)
                   or self._non_finite_grads())
        if message is None:
            return False
        if self.cfg.train.nan_policy == "stop":
            self._stop(message, skip_hint=not self.engine.updates_in_backward)
        self._skip_reason = message  # the floor's message repeats the last one
        self._print(f"{message}: update skipped (train.nan_policy=skip)")
        return True

    def _non_finite_grads(self) -> str | None:
        if not self.engine.non_finite_grads():
            return None
        return (f"non-finite gradients at iteration {self.iteration + 1} with a finite loss "
                f"(the batch starts at consumed sample {self.consumed_samples})")

    @staticmethod
    def _stop(message: str, skip_hint: bool) -> None:
        """train.nan_policy=stop: end the run before anything is saved, so `latest` stays on
        the last good checkpoint."""
        hint = ", or set train.nan_policy=skip" if skip_hint else ""
        raise faults.NonFiniteLoss(f"{message}; train.nan_policy=stop ended the run: resume "
                                   f"from the last checkpoint with a lower optim.lr{hint}")

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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation losses, of the EMA weights when train.ema_decay is set."""
        with self._ema_weights():
            reports = self.engine.forward_only(self.data.valid_iterators(),
                                               self.cfg.train.eval_iters)
        out = self._reduce(reports)
        return {k: v for k, v in out.items() if not k.endswith("_tokens")}

    def _ema_weights(self):
        return self.ema.applied(self.chunks) if self.ema is not None else contextlib.nullcontext()

    def _reduce(self, reports: list[dict]) -> dict[str, float]:
        """The global batch's losses on every rank (training/loss.py), without the losses no
        token counted for."""
        z_loss = bool(self.cfg.train.z_loss_weight)
        return present_losses(reduce_on_last_stage(reports, self.platform.device(), z_loss))

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
        """Collective: the engine's state (and the EMA) into a new checkpoint folder, published
        only once complete (checkpoint/layout.py)."""
        meta = {"config": self.cfg.to_dict(), "vocab": self.data.layout.to_dict(),
                "padded_vocab_size": self.padded_vocab_size, "has_ema": self.ema is not None}
        extras = None
        if self.ema is not None:
            extras = {ema.KEY: self.ema.sharded_state_dict(self.chunks)}
        state = layout.TrainState(self.iteration, self.consumed_samples)
        self._last_save = self.iteration
        if self.cfg.checkpoint.async_save:
            self._start_async_save(state, meta, extras)
            return
        folder = layout.publish_checkpoint(
            self.cfg.checkpoint_dir, state, meta,
            lambda tmp: self.engine.save(tmp, state, extras))
        self._print(f"saved checkpoint {folder}")

    def _start_async_save(self, state: layout.TrainState, meta: dict[str, Any],
                          extras: dict[str, Any] | None) -> None:
        """checkpoint.async_save: the megatron engine's writer runs on while training goes
        on; the save is published (meta.json, manifest, rename, `latest`) once it is done on
        every rank (training/async_save.py). One save at a time: the previous one first."""
        self.publish_finished_saves(wait=True)
        root = self.cfg.checkpoint_dir
        tmp = layout.begin_save(root, state.iteration)
        with layout.full_disk_reported(tmp, root):
            request, written = self.engine.start_save(tmp, state, extras)

        def publish() -> None:  # module attribute at call time: the crash tests patch it
            layout.publish_save(root, state, dict(meta, **written))

        self.pending_saves.start(request, publish, tmp, root, state.iteration)
        self._print(f"started an asynchronous save of iteration {state.iteration}")

    def publish_finished_saves(self, wait: bool) -> None:
        """Collective: publish the asynchronous saves done on every rank (all of them, waiting
        for their writers, when `wait`)."""
        done = self.pending_saves.wait() if wait else self.pending_saves.poll()
        for iteration in done:
            folder = layout.iteration_dir(self.cfg.checkpoint_dir, iteration)
            self._print(f"saved checkpoint {folder} (asynchronous)")

    def _saved_at(self, iteration: int) -> bool:
        return self._last_save == iteration

    def _is_writer(self) -> bool:
        return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)

    def _log_startup(self) -> None:
        counts = self.engine.parameter_counts()
        self._print(f"platform {self.platform.device_type}/{self.platform.backend}, "
                    f"{self.engine.describe()}; {counts['total']:,} parameters (with "
                    f"embeddings); vocabulary {self.data.layout.size} ids padded to "
                    f"{self.padded_vocab_size}; {self.data.num_microbatches} microbatches "
                    f"per step")
        if "trainable" in counts:  # the megatron engine counts what model.freeze froze
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
        self.publish_finished_saves(wait=True)  # before exit 75: `latest` on the newest save
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




def build_engine(cfg: Config, chunks: list[torch.nn.Module], data: DataPipeline,
                 padded_vocab_size: int, platform: Platform) -> Engine:
    """The engine train.engine names, around this rank's model chunks."""
    if cfg.train.engine == "deepspeed":
        from megatron_t2i.training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, chunks, platform, data.num_microbatches)
    from megatron_t2i.training.megatron_engine import MegatronEngine

    return MegatronEngine(cfg, chunks, data.layout, padded_vocab_size, data.num_microbatches,
                          platform.device())


def run(cfg: Config) -> dict[str, Any]:
    """Train with the engine the config names (train.engine)."""
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.close()
