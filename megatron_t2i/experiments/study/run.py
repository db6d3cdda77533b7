"""The whole mini-study: its data, every run (pipeline.py) and the report (report.py).

    python tools/mini_study.py [--quick] --out DIR
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path

from megatron_t2i.experiments.study.data import prepare_study_data
from megatron_t2i.experiments.study.pipeline import (
    FULL,
    QUICK,
    StepTime,
    StudyError,
    plan,
    run_steps,
)
from megatron_t2i.experiments.study.report import write_report


def run_study(out: Path, quick: bool = False, jobs: int | None = None,
              resume: bool = True, corpus: str | None = None) -> dict:
    """Data, every run, and the report; returns the summary (also in out/summary.json).
    `corpus="shapes"` runs the positive control (the synthetic shapes) instead."""
    if importlib.util.find_spec("matplotlib") is None:  # the figures, at the very end
        raise StudyError("the mini-study draws its figures with matplotlib: "
                         "pip install 'megatron_t2i[plot]'")
    scale = QUICK if quick else FULL
    if corpus is not None:
        scale = dataclasses.replace(scale, data=dataclasses.replace(scale.data, corpus=corpus))
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    start = time.perf_counter()
    print(f"[mini-study] {scale.name} mode ({scale.data.corpus}), {jobs} steps at a time, "
          f"output {out}", flush=True)
    cpu = time.process_time()  # data preparation runs in this process
    data = prepare_study_data(out / "data", scale.data)
    times = {"data": StepTime(time.perf_counter() - start, time.process_time() - cpu)}
    print(f"[mini-study] data ready ({times['data'].wall:.0f}s, {times['data'].cpu:.0f} CPU s)",
          flush=True)
    steps = plan(out, data, scale)
    times.update(run_steps(steps, out, jobs, resume))
    return write_report(out, data, scale, steps, times, time.perf_counter() - start)
