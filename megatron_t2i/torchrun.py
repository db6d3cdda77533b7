"""torchrun that passes the ranks' exit status 75 on.

    python -m megatron_t2i.torchrun [torchrun options] -m megatron_t2i.train --config ...

torchrun reports any worker that exits non-zero as a failure and itself exits 1, so a script
that requeues a job on 75 (stopped on a signal after a complete checkpoint) would not. This
runs torchrun unchanged (same options, same output) and exits 75 instead of 1 when every
local rank stopped with 75: each rank leaves a note in a folder named by T2I_EXIT_STATUS_DIR
(training/faults.py), which also covers torchrun's own signal handling (--signals-to-handle),
where it forwards the signal to the ranks and keeps no exit codes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from megatron_t2i.training.faults import EXIT_STATUS_DIR_ENV, PREEMPTED_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args
    from torch.distributed.run import main as torchrun_main

    argv = sys.argv[1:] if argv is None else argv
    local_ranks = determine_local_world_size(parse_args(argv).nproc_per_node)
    with tempfile.TemporaryDirectory(prefix="t2i-exit-status-") as folder:
        os.environ[EXIT_STATUS_DIR_ENV] = folder  # the ranks inherit it
        try:
            torchrun_main(argv)
        except ChildFailedError as e:  # a rank exited non-zero: torchrun stopped the others
            codes = sorted(f.exitcode for f in e.failures.values())
            if not _all_preempted(folder, local_ranks) or set(codes) != {PREEMPTED_EXIT_CODE}:
                raise
            return _preempted(f"ranks {sorted(e.failures)} exited {codes}")
        except SignalException as e:  # torchrun got the signal and passed it on to the ranks
            if not _all_preempted(folder, local_ranks):
                raise
            return _preempted(f"torchrun passed {e.sigval.name} on to the ranks")
    return 0


def _all_preempted(folder: str, local_ranks: int) -> bool:
    return len(list(Path(folder).glob("local_rank_*"))) >= local_ranks


def _preempted(how: str) -> int:
    print(f"[megatron_t2i.torchrun] {how}: every rank stopped after saving a checkpoint; "
          f"exit {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
