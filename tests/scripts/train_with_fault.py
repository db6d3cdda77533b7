"""`python -m megatron_t2i.train` with a node failure injected (run by the crash tests).

    MEGATRON_T2I_KILL_AT=save@N   python tests/scripts/train_with_fault.py --config ...
    MEGATRON_T2I_KILL_AT=writer@N python tests/scripts/train_with_fault.py --config ...

save@N: SIGKILL the job's whole process group (launcher, ranks, dist_checkpointing's helper
processes) while saving iteration N, after every shard is written and before the save is
published, as a node failure would. writer@N: SIGKILL the rank from the shard-writer processes
megatron-core forks while saving iteration N, which then go on as if the rank had died under
them (a kill -9, the OOM killer).

The hook is installed here, by patching the one publish function (checkpoint/layout.py) and the
megatron engine's one shard writer (training/checkpointing.py) before the normal entry point
runs: nothing of it is in the library.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_t2i.checkpoint import layout  # noqa: E402
from megatron_t2i.training import checkpointing, writer_guard  # noqa: E402

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


def install(spec: str) -> None:
    where, _, iteration = spec.partition("@")
    hooks = {"save": _kill_job_before_publish, "writer": _kill_rank_from_writer}
    if where not in hooks or not iteration.isdigit():
        raise SystemExit(f"MEGATRON_T2I_KILL_AT={spec!r}: expected save@N or writer@N")
    hooks[where](int(iteration))


if __name__ == "__main__":
    install(os.environ["MEGATRON_T2I_KILL_AT"])
    from megatron_t2i.train import main

    sys.exit(main())
