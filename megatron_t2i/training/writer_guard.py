"""No orphaned checkpoint writers: the processes a save starts die with their rank.

megatron-core 0.16 writes a save's shards from processes it forks, one per write bucket
(`FileSystemWriterAsync.write_preloaded_data_multiproc`; 0.17+ use threads there), and an
asynchronous save, on every release, from one more process forked around them
(`TemporalAsyncCaller`). They report through a queue served by a Manager process spawned once
per rank (`filesystem_async._results_queue`). After a kill -9 of a rank mid-save, writers and
Manager lived on (seen: a writer for 20+ minutes holding ~340 MB, the Manager ~270 MB, and
with them the job's output pipes; on 0.19.2 with this guard off, the asynchronous test job
ran into its timeout). Here every process forked during a save, and the Manager (started by
us, for megatron-core to find), asks the kernel for SIGKILL when its parent dies (Linux
`prctl(PR_SET_PDEATHSIG)`), and exits at once if the parent is already gone. Partial files are
left in `iter_N.tmp/`, which the next save removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_state: dict = {"saving": False, "parent": 0, "manager": None}


def die_with_parent(parent: int) -> None:
    """In a child process of `parent`: be SIGKILLed when the parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _before_fork() -> None:
    _state["parent"] = os.getpid()


def _in_forked_child() -> None:
    if _state["saving"]:
        die_with_parent(_state["parent"])


os.register_at_fork(before=_before_fork, after_in_child=_in_forked_child)


def _guard_results_queue() -> None:
    """Start megatron-core's results-queue Manager ourselves (spawned, like its own), with the
    parent-death signal, before megatron-core starts an unguarded one."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(die_with_parent, (os.getpid(),))
    _state["manager"] = manager  # shut down by its finalizer when this process exits
    filesystem_async._results_queue = manager.Queue()


@contextlib.contextmanager
def writers_die_with_rank() -> Iterator[None]:
    """Around a save: the processes it starts are killed when this rank dies."""
    _guard_results_queue()
    _state["saving"] = True
    try:
        yield
    finally:
        _state["saving"] = False


def saving() -> bool:
    """True while a save runs under writers_die_with_rank (in its forked writers too)."""
    return _state["saving"]
