"""Reading a run directory's `metrics.jsonl` back (training/metrics.py writes it): the
records by split and iteration, and one metric as (x, y) against iterations, samples or tokens.
The end-of-run loss picture (loss_plot.py) and the run charts (experiments/plots.py) read
runs through it.

A resumed run may log an iteration twice (it restarted from a checkpoint older than its last
logged line): the later line wins. NaN/Inf were written as null and leave a gap.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import yaml

XAxis = Literal["iteration", "samples", "tokens"]


class PlotError(ValueError):
    """A run directory or option that cannot be plotted; the message names it."""


@dataclasses.dataclass
class Run:
    label: str
    records: dict[str, list[dict]]  # split ("train" | "valid") -> records by iteration
    seq_length: int | None


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read `<run_dir>/metrics.jsonl` (and the sequence length from its config.yaml)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it a training run directory?)")
    by_split: dict[str, dict[int, dict]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = int(record["iteration"])
        except (ValueError, KeyError, TypeError) as e:
            raise PlotError(f"{path}:{number}: not a metrics record ({e})") from None
        by_split.setdefault(record.get("split", "train"), {})[iteration] = record
    records = {split: [r[i] for i in sorted(r)] for split, r in by_split.items()}
    return Run(label or run_dir.name, records, _seq_length(run_dir / "config.yaml"))


def _seq_length(config: Path) -> int | None:
    if not config.is_file():
        return None
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    return model.get("seq_length")


def series(run: Run, metric: str, x: XAxis = "iteration") -> tuple[list[float], list[float]]:
    """(x, y) of one metric: `valid/<name>` reads validation records; nulls are left out."""
    split, name = metric.split("/", 1) if "/" in metric else ("train", metric)
    xs, ys = [], []
    for record in run.records.get(split, []):
        if record.get(name) is None:
            continue
        xs.append(_x_value(run, record, x))
        ys.append(float(record[name]))
    return xs, ys


def _x_value(run: Run, record: dict, x: XAxis) -> float:
    if x == "iteration":
        return record["iteration"]
    samples = record.get("consumed_samples")
    if samples is None:
        raise PlotError(f"run {run.label}: --x {x} needs consumed_samples, which this run's "
                        f"metrics.jsonl does not have")
    if x == "samples":
        return samples
    if run.seq_length is None:
        raise PlotError(f"run {run.label}: --x tokens needs model.seq_length from the run's "
                        f"config.yaml, which is missing")
    return samples * run.seq_length
