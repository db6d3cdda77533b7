"""Charts of one or more runs' `metrics.jsonl`, for people without a dashboard.

    paths = plot_runs(["runs/pretrained", "runs/random_init"], "plots", x="tokens")

One PNG per metric (every run a line: e.g. image loss against tokens seen for pretrained vs
random init), plus `overview.png` with the throughput-dashboard panels side by side.
`tools/plot_run.py` is the command line.

A run directory holds `metrics.jsonl` (training/metrics.py) and `config.yaml` (for the
sequence length that turns consumed samples into tokens). A resumed run may log an iteration
twice (it restarted from a checkpoint older than its last logged line): the later line wins.
NaN/Inf were written as null and leave a gap.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import yaml

XAxis = Literal["iteration", "samples", "tokens"]

# The throughput dashboard's panels, in order: (metric, title). Validation losses are
# "valid/<name>".
PANELS = (
    ("loss", "loss"),
    ("loss_text", "text loss"),
    ("loss_image", "image loss"),
    ("valid/loss", "validation loss"),
    ("tokens_per_sec", "tokens/s"),
    ("tflops_per_gpu", "TFLOP/s per GPU"),
    ("mfu", "MFU"),
    ("grad_norm", "gradient norm"),
    ("lr", "learning rate"),
    ("memory_gib", "memory (GiB)"),
    ("data_wait_fraction", "data wait (fraction of iteration)"),
)
_X_LABELS = {"iteration": "iteration", "samples": "samples seen", "tokens": "tokens seen"}


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


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, x: XAxis = "iteration",
              metrics: list[str] | None = None, labels: list[str] | None = None,
              log_y: bool = False) -> list[Path]:
    """Write `<metric>.png` per metric any run has, and `overview.png`; returns the paths."""
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} runs")
    if x not in _X_LABELS:
        raise PlotError(f"x axis {x!r} is not one of {list(_X_LABELS)}")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    titles = dict(PANELS)
    wanted = metrics or [m for m, _ in PANELS]
    unknown = [m for m in wanted if not any(series(r, m, "iteration")[0] for r in runs)]
    if metrics and unknown:
        raise PlotError(f"no run has {', '.join(unknown)}; metrics found: "
                        f"{', '.join(_metric_names(runs))}")
    present = [m for m in wanted if m not in unknown]
    if not present:
        raise PlotError(f"nothing to plot in {', '.join(map(str, run_dirs))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = []
    for metric in present:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        _draw(ax, runs, metric, titles.get(metric, metric), x, log_y)
        paths.append(_save(fig, out_dir / f"{metric.replace('/', '_')}.png", plt))
    cols = 3
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        _draw(ax, runs, metric, titles.get(metric, metric), x, log_y)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    paths.append(_save(fig, out_dir / "overview.png", plt))
    return paths


def _metric_names(runs: list[Run]) -> list[str]:
    names = set()
    for run in runs:
        for split, records in run.records.items():
            prefix = "" if split == "train" else f"{split}/"
            for record in records:
                names.update(prefix + k for k, v in record.items()
                             if isinstance(v, (int, float)) and k not in ("iteration", "time"))
    return sorted(names)


def _draw(ax, runs: list[Run], metric: str, title: str, x: XAxis, log_y: bool) -> None:
    for run in runs:
        xs, ys = series(run, metric, x)
        if xs:
            ax.plot(xs, ys, label=run.label, linewidth=1.2,
                    marker="o" if len(xs) < 20 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(_X_LABELS[x])
    ax.grid(alpha=0.3)
    if log_y:
        ax.set_yscale("log")
    if len(runs) > 1:
        ax.legend(fontsize="small")


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'megatron_t2i[plot]'") from None
    matplotlib.use("Agg")  # files only; no display on a cluster's login node
    import matplotlib.pyplot as plt

    return plt
