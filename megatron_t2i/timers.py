"""Wall-clock timers shared by the data loader (data wait) and the trainer (iteration time).

    wait = Stopwatch()
    batches = TimedIterator(iter(loader), wait)   # time blocked in next() adds up in `wait`
    ... one iteration ...
    data_wait_seconds = wait.pop()                # read and reset
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


class Stopwatch:
    """Sums the time spent inside `with stopwatch:` blocks until `pop()` reads and resets it."""

    def __init__(self) -> None:
        self._total = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._total += time.perf_counter() - self._start

    def pop(self) -> float:
        total, self._total = self._total, 0.0
        return total


class TimedIterator(Iterator[T]):
    """Wraps a data iterator so the time blocked in `next()` counts as data wait.

    The pipeline schedules pull microbatches themselves, so timing the iterator (rather than
    one call site) is what catches every wait.
    """

    def __init__(self, iterator: Iterator[T], stopwatch: Stopwatch) -> None:
        self.iterator = iterator
        self.stopwatch = stopwatch

    def __next__(self) -> T:
        with self.stopwatch:
            return next(self.iterator)
