"""`python -m megatron_t2i.train` with a node failure injected (run by the crash tests).

    MEGATRON_T2I_KILL_AT=save@N   python tests/scripts/train_with_fault.py --config ...
    MEGATRON_T2I_KILL_AT=writer@N python tests/scripts/train_with_fault.py --config ...
    MEGATRON_T2I_KILL_AT=async@N  python tests/scripts/train_with_fault.py --config ...
    MEGATRON_T2I_KILL_AT=term@N   python tests/scripts/train_with_fault.py --config ...
    MEGATRON_T2I_KILL_AT=asyncrank@N python tests/scripts/train_with_fault.py --config ...

save@N: SIGKILL the job's whole process group (launcher, ranks, dist_checkpointing's helper
processes) while saving iteration N, after every shard is written and before the save is
published, as a node failure would. writer@N: SIGKILL the rank while megatron-core writes
the shards of iteration N: on 0.16 from the writer processes it forks, which then go on as if
the rank had died under them (a kill -9, the OOM killer); on 0.17+, whose synchronous save
writes from threads of the rank, from one of those threads. async@N (checkpoint.async_save):
SIGKILL the job's process group while the asynchronous save of iteration N is pending, at the
trainer's next poll of it, before it can be published. term@N (checkpoint.async_save): the writer of every asynchronous
save sleeps 2 s first, and the rank sends itself SIGTERM right after starting the save of
iteration N, so the signal arrives while that save is being written. asyncrank@N: the same
slowed writer, and the rank SIGKILLs itself right after starting the save of iteration N.

The hook is installed here, by patching the one publish function (checkpoint/layout.py) and the
megatron engine's one shard writer (training/checkpointing.py) before the normal entry point
runs: nothing of it is in the library.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_t2i.checkpoint import layout  # noqa: E402
from megatron_t2i.training import async_save, checkpointing, writer_guard  # noqa: E402

_saving = {"iteration": None}


def _kill_job_before_publish(iteration: int):
    publish = layout.publish_save

    def publish_or_die(root, state, meta):
        if state.iteration == iteration:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return publish(root, state, meta)

    layout.publish_save = publish_or_die


def _kill_rank_from_writer(iteration: int) -> None:
    write = checkpointing.write_sharded

    def remember_iteration(folder, state, *args, **kwargs):
        _saving["iteration"] = state.iteration
        try:
            return write(folder, state, *args, **kwargs)
        finally:
            _saving["iteration"] = None

    def in_forked_child() -> None:
        # after writer_guard's own handler (registered first, at import): the guard is set
        if _saving["iteration"] == iteration and writer_guard.saving():
            os.kill(os.getppid(), signal.SIGKILL)

    checkpointing.write_sharded = remember_iteration
    os.register_at_fork(after_in_child=in_forked_child)
    name, write_buckets = _shard_writer()
    if name == "write_preloaded_data_multithread":
        # 0.17+: a synchronous save forks no writer; its writer threads run in the rank, and
        # the rank is killed from one of them
        def kill_rank_from_thread(*args, **kwargs):
            if _saving["iteration"] == iteration:
                os.kill(os.getpid(), signal.SIGKILL)
            return write_buckets(*args, **kwargs)

        _set_shard_writer(name, kill_rank_from_thread)


def _kill_job_while_async_save_pending(iteration: int) -> None:
    for name in ("poll", "wait"):
        finalize = getattr(async_save.PendingSaves, name)

        def finalize_or_die(self, _finalize=finalize):
            if iteration in self.pending():
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return _finalize(self)

        setattr(async_save.PendingSaves, name, finalize_or_die)


def _shard_writer():
    """megatron-core's function that writes a save's buckets, by its name in this release: it
    forks one writer per bucket on 0.16 and starts threads on 0.17+."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    name = next(n for n in ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")
                if hasattr(FileSystemWriterAsync, n))
    return name, getattr(FileSystemWriterAsync, name)


def _set_shard_writer(name: str, function) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    setattr(FileSystemWriterAsync, name, staticmethod(function))


def _slow_async_writer() -> None:
    name, write = _shard_writer()

    def slow_write(*args, **kwargs):  # in the forked writer: the save stays in flight
        time.sleep(2.0)
        return write(*args, **kwargs)

    _set_shard_writer(name, slow_write)


def _signal_after_async_start(iteration: int, signum: int) -> None:
    _slow_async_writer()
    start = async_save.PendingSaves.start

    def start_then_signal(self, request, publish, tmp, root, saved_iteration):
        start(self, request, publish, tmp, root, saved_iteration)
        if saved_iteration == iteration:
            os.kill(os.getpid(), signum)

    async_save.PendingSaves.start = start_then_signal


def _sigterm_during_async_save(iteration: int) -> None:
    _signal_after_async_start(iteration, signal.SIGTERM)


def _kill_rank_during_async_save(iteration: int) -> None:
    _signal_after_async_start(iteration, signal.SIGKILL)


def install(spec: str) -> None:
    where, _, iteration = spec.partition("@")
    hooks = {"save": _kill_job_before_publish, "writer": _kill_rank_from_writer,
             "async": _kill_job_while_async_save_pending, "term": _sigterm_during_async_save,
             "asyncrank": _kill_rank_during_async_save}
    if where not in hooks or not iteration.isdigit():
        raise SystemExit(f"MEGATRON_T2I_KILL_AT={spec!r}: expected save@N, writer@N, async@N, "
                         f"term@N or asyncrank@N")
    hooks[where](int(iteration))


if __name__ == "__main__":
    install(os.environ["MEGATRON_T2I_KILL_AT"])
    from megatron_t2i.train import main

    sys.exit(main())
