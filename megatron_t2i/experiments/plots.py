"""Charts of one or more runs' `metrics.jsonl`, for people without a dashboard.

    paths = plot_runs(["runs/pretrained", "runs/random_init"], "plots", x="tokens")

One PNG per metric (every run a line: e.g. image loss against tokens seen for pretrained vs
random init), plus `overview.png` with the throughput-dashboard panels side by side.
`tools/plot_run.py` is the command line.

Runs are read by training/run_log.py (`metrics.jsonl` and the sequence length from
`config.yaml`, which turns consumed samples into tokens).
"""

from __future__ import annotations

from pathlib import Path

from megatron_t2i.training.run_log import PlotError, Run, XAxis, load_run, series

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
