"""What a long job on a shared cluster meets besides training: preemption signals, a diverged
loss, and a rank that stops answering.

Exit codes of `python -m megatron_t2i.train` (what an sbatch script branches on):

    0   finished (train.train_iters reached, or train.exit_interval)
    1   an error, with a message: bad checkpoint or data, a non-finite loss under
        train.nan_policy=stop, a collective that timed out (a hung or dead rank)
    2   a configuration that cannot run
    75  stopped on a signal (train.exit_signals) after saving a complete checkpoint:
        run the same command again to resume (EX_TEMPFAIL of sysexits.h, "try again later")

Signals: a handler only sets a flag, since the checkpoint save is a collective that every rank
must enter after the same iteration. After each iteration the ranks agree through an
all-reduce (MAX) of their flags, so a signal that reached one rank stops them all. After such a
stop the signals stay caught, then ignored, until the process exits: the first rank to leave
makes torchrun (or srun --kill-on-bad-exit) SIGTERM the others, and that SIGTERM must not turn
their 75 into a death by signal. torchrun reports 1 for any failed worker: start it through
`python -m megatron_t2i.torchrun` to get 75 when every rank stopped with 75.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
# Set by megatron_t2i.torchrun: a folder where each local rank that stops with 75 says so,
# since torchrun itself reports only "a worker failed" (exit 1).
EXIT_STATUS_DIR_ENV = "T2I_EXIT_STATUS_DIR"


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; resuming continues it."""

    def __init__(self, signal_name: str, iteration: int) -> None:
        super().__init__(f"stopped on {signal_name} after iteration {iteration} with a "
                         f"checkpoint saved; run the same command again to resume")
        self.signal_name = signal_name
        self.iteration = iteration


class NonFiniteLoss(RuntimeError):
    """A NaN or Inf loss (or gradient norm); the message says at which iteration and where."""


def signal_number(name: str) -> int:
    """`"SIGUSR1"` -> 10; raises ValueError naming the bad signal."""
    try:
        return int(signal.Signals[name.strip().upper()])
    except KeyError:
        raise ValueError(f"{name!r} is not a signal name (for example SIGTERM, SIGUSR1)") from None


class ExitSignals:
    """Turns the configured signals into a flag that all ranks read together.

        signals = ExitSignals(["SIGTERM", "SIGUSR1"]); signals.install()
        ... after each iteration: if (signum := signals.agreed(device)): save; exit 75
        signals.restore()
    """

    def __init__(self, names: list[str]) -> None:
        self.numbers = [signal_number(n) for n in names]
        self.received = 0  # the last signal number seen by this rank, 0 for none
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def ignore(self) -> None:
        """After a stop on a signal: ignore further ones at the OS level. A Python handler
        would not do, since the interpreter resets those to the default while it exits."""
        for number in self.numbers:
            signal.signal(number, signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = number  # nothing else is safe here: the save must be collective

    def agreed(self, device: torch.device | str) -> int:
        """Collective: the largest signal number any rank received (0 when none did)."""
        if not self.numbers:
            return 0
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def record_preempted() -> None:
    """Leave a note for megatron_t2i.torchrun that this rank stops with 75 (no-op elsewhere)."""
    folder = os.environ.get(EXIT_STATUS_DIR_ENV)
    if folder:
        local_rank = os.environ.get("LOCAL_RANK", "0")
        Path(folder, f"local_rank_{local_rank}").write_text(f"{PREEMPTED_EXIT_CODE}\n")


def signal_name(number: int) -> str:
    return signal.Signals(number).name


def check_loss(report: dict[str, float], iteration: int, consumed_samples: int) -> str | None:
    """A message saying which loss is not finite at `iteration`, or None when all are.

    Every rank holds the same reduced losses, so every rank reaches the same verdict without
    another collective.
    """
    # the losses are the keys with a token count beside them (training/loss.py REPORT_KEYS)
    bad = [name for name in report if f"{name}_tokens" in report
           and not math.isfinite(report[name]) and report[f"{name}_tokens"] > 0]
    if not bad:
        return None
    values = ", ".join(f"{name}={report[name]}" for name in bad)
    return (f"non-finite loss at iteration {iteration} ({values}; the batch starts at "
            f"consumed sample {consumed_samples})")


def is_collective_timeout(error: BaseException) -> bool:
    """gloo raises a RuntimeError that mentions a timeout when a peer never arrives."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)
