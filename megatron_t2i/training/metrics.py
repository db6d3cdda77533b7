"""Metric sinks: one dict of scalars per logged iteration, to stdout, `metrics.jsonl`,
TensorBoard and W&B.

    logger = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), is_writer=is_last_stage_tp0_dp0)
    speed = Throughput(tokens_per_iteration, flops_per_iteration(...), world_size, peak)
    logger.log(iteration, {"loss": ..., "lr": ..., **speed.scalars(iter_time, data_wait)})
    logger.log_eval(iteration, {"loss": ..., "loss_text": ..., "loss_image": ...})
    logger.close()

Scalar names the stdout line knows (any other name is still written to the other sinks):
loss, loss_text, loss_image, lr, grad_norm, tokens_per_sec, tflops_per_gpu, mfu,
data_wait_fraction, memory_gib.

Where each sink puts things:
- `metrics.jsonl`: one JSON object per line, `{"iteration", "split" ("train" | "valid"),
  "time" (unix seconds), **scalars}`, flushed per line and appended to, so a resumed run
  continues the same file. Non-finite values (a diverged loss, an inf grad norm) are written
  as JSON `null` and the record is kept: NaN/Infinity are not JSON, and a reader should see
  the iteration happened.
- TensorBoard (`<run_dir>/tensorboard`) and W&B: tags `train/<name>` and `valid/<name>`;
  sample grids as the image `samples`, their caption fidelity as `samples/<name>`.
  W&B plots against the logged `iteration` (not its own step counter), so a run resumed
  from a checkpoint older than its last logged iteration still records its points.
- W&B: the run id lives in `<run_dir>/wandb_run_id`; a restarted job reads it and continues
  the same run (`resume="allow"`). Mode comes from the config (offline by default).

Only the writer rank (last pipeline stage, tensor-parallel rank 0, data-parallel rank 0:
the rank that holds the loss) writes anything; on other ranks every method is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_t2i.config import LoggingConfig
from megatron_t2i.training.flops import mfu

# (scalar name, format) in the order the stdout line shows them.
_STDOUT_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("loss_text", "text {:.4f}"),
    ("loss_image", "image {:.4f}"),
    ("z_loss", "z {:.3f}"),
    ("lr", "lr {:.3e}"),
    ("grad_norm", "grad {:.3f}"),
    ("tokens_per_sec", "{:,.0f} tok/s"),
    ("tflops_per_gpu", "{:.3g} TFLOP/s"),
    ("mfu", "MFU {:.1%}"),
    ("data_wait_fraction", "data wait {:.1%}"),
    ("memory_gib", "mem {:.1f} GiB"),
    ("skips_in_a_row", "skipped {:.0f} in a row"),  # train.nan_policy=skip only
    ("skips_total", "{:.0f} in all"),
)


class MetricsLogger:
    """Fans one scalar dict per iteration out to every enabled sink (writer rank only)."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, full_config: dict[str, Any],
                 is_writer: bool) -> None:
        self.run_dir = Path(run_dir)
        self.is_writer = is_writer
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not is_writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.tensorboard:
            self._tensorboard = _open_tensorboard(self.run_dir)
        if cfg.wandb:
            self._wandb = _open_wandb(self.run_dir, cfg, full_config)

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        """Record the training scalars of `iteration` and print one summary line."""
        if not self.is_writer:
            return
        self._write(iteration, scalars, split="train")
        print(format_line(f"iter {iteration:>7d}", scalars), flush=True)

    def log_eval(self, iteration: int, scalars: dict[str, float]) -> None:
        """Record validation scalars measured at `iteration`."""
        if not self.is_writer:
            return
        self._write(iteration, scalars, split="valid")
        print(format_line(f"valid at iter {iteration:>7d}", scalars), flush=True)

    def log_samples(self, iteration: int, grid: Any,
                    scalars: dict[str, float] | None = None) -> None:
        """A grid of samples (a PIL image) as the image `samples`, and its scores (caption
        fidelity) as split "samples" (training/sampling.py)."""
        if not self.is_writer:
            return
        if scalars:
            self._write(iteration, scalars, split="samples")
        pixels = np.asarray(grid.convert("RGB"))
        if self._tensorboard is not None:
            self._tensorboard.add_image("samples", pixels, global_step=iteration,
                                        dataformats="HWC")
            self._tensorboard.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"iteration": iteration, "samples": wandb.Image(pixels)})

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            # finish() can return before W&B's service process has written the offline run
            # file (a reader then finds it empty); teardown waits for the service to stop.
            wandb.teardown()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, iteration: int, scalars: dict[str, float], split: str) -> None:
        record = {"iteration": iteration, "split": split, "time": time.time()}
        record.update({name: _json_number(value) for name, value in scalars.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        tagged = {f"{split}/{name}": float(value) for name, value in scalars.items()}
        if self._tensorboard is not None:
            for tag, value in tagged.items():
                self._tensorboard.add_scalar(tag, value, global_step=iteration)
        if self._wandb is not None:
            self._wandb.log({"iteration": iteration, **tagged})


def format_line(head: str, scalars: dict[str, float]) -> str:
    """A compact one-line summary of the scalars the stdout line knows, in a fixed order."""
    parts = [head] + [fmt.format(float(scalars[name])) for name, fmt in _STDOUT_FIELDS
                      if name in scalars]
    return " | ".join(parts)


def _json_number(value: Any) -> int | float | None:
    """Ints stay ints; NaN and +-inf become None (JSON null), as JSON has no such numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def _open_tensorboard(run_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # imported only when enabled

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _open_wandb(run_dir: Path, cfg: LoggingConfig, full_config: dict[str, Any]) -> Any:
    import wandb  # optional dependency, imported only when enabled

    run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name,
                     group=cfg.wandb_group, tags=list(cfg.wandb_tags) or None,
                     mode=cfg.wandb_mode, dir=str(run_dir), config=full_config,
                     id=wandb_run_id(run_dir), resume="allow")
    run.define_metric("iteration")
    for split in ("train", "valid", "samples"):
        run.define_metric(f"{split}/*", step_metric="iteration")
    return run


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of this run directory, created on first use so restarts share it."""
    path = Path(run_dir) / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    path.write_text(run_id + "\n")
    return run_id


# ---- throughput ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Throughput:
    """Turns an iteration's wall time into tokens/s, TFLOP/s per GPU and MFU.

    `flops_per_iteration` is the whole job's (all GPUs); dividing by `world_size` gives the
    per-GPU rate that MFU compares with one GPU's peak.
    """

    tokens_per_iteration: int  # global batch size x sequence length
    flops_per_iteration: float
    world_size: int
    peak_tflops_per_gpu: float

    def scalars(self, iteration_time: float, data_wait_time: float = 0.0) -> dict[str, float]:
        """Rates for one iteration (or the mean over a logging interval) of `iteration_time`
        seconds, `data_wait_time` of which was spent waiting for the data iterator."""
        tflops = self.flops_per_iteration / iteration_time / self.world_size / 1e12
        return {
            "iteration_time": iteration_time,
            "tokens_per_sec": self.tokens_per_iteration / iteration_time,
            "tflops_per_gpu": tflops,
            "mfu": mfu(tflops, self.peak_tflops_per_gpu),
            "data_wait_fraction": data_wait_fraction(data_wait_time, iteration_time),
        }


def data_wait_fraction(data_wait_time: float, iteration_time: float) -> float:
    """Share of an iteration spent blocked on data: near 0 when the loader keeps up."""
    return data_wait_time / iteration_time if iteration_time > 0 else 0.0
