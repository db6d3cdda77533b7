"""Asynchronous checkpoint saves (`checkpoint.async_save: true`, megatron engine only).

megatron-core's dist_checkpointing returns an `AsyncRequest` for the tensors of a save (its own
kind, also on 0.17+: training/checkpointing.py); its `AsyncCallsQueue` forks one process per
rank that writes them while training goes on. A save's
finalization (megatron-core's own: the write results and metadata; then ours: meta.json, the
manifest, the rename and `latest`, checkpoint/layout.py `publish_save`) runs only once the
writer has finished on *every* rank: the queue all-reduces an is-alive flag before it
finalizes. So `latest` moves only then, and a job killed in between resumes from the previous
complete save (the `iter_N.tmp/` is removed by the next save).

The trainer polls after each iteration (one all-reduce while a save is pending, none
otherwise), and waits before the next save, at the end of training and before exiting on a
signal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.async_utils import (
    AsyncCallsQueue,
    AsyncRequest,
)

from megatron_t2i.checkpoint.layout import full_disk_reported
from megatron_t2i.training.writer_guard import writers_die_with_rank


class PendingSaves:
    """The asynchronous saves of this rank that are written but not yet published."""

    def __init__(self) -> None:
        self._queue = AsyncCallsQueue()
        self._folders: deque[tuple[Path, Path, int]] = deque()  # (tmp, root, iteration)

    def start(self, request: AsyncRequest, publish: Callable[[], None], tmp: Path, root: Path,
              iteration: int) -> None:
        """Collective: fork the writer of `request`; `publish` runs once it is done on all
        ranks."""
        request.add_finalize_fn(publish)
        with writers_die_with_rank():  # the writer (and the processes it forks) die with us
            self._queue.schedule_async_request(request)
        self._folders.append((tmp, root, iteration))

    def pending(self) -> list[int]:
        """The iterations whose saves are started and not yet published."""
        return [iteration for _, _, iteration in self._folders]

    def poll(self) -> list[int]:
        """Collective, non-blocking: publish the saves finished on every rank."""
        return self._finalize(blocking=False)

    def wait(self) -> list[int]:
        """Collective: wait for every pending save and publish it."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> list[int]:
        if not self._folders:
            return []
        tmp, root, _ = self._folders[0]
        with full_disk_reported(tmp, root):
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        published = [self._folders.popleft()[2] for _ in done]
        return published
