#!/usr/bin/env python
"""PNG charts of one or more training runs (their metrics.jsonl), for people without a dashboard.

    python tools/plot_run.py runs/pretrained runs/random_init --x tokens --out plots/
    python tools/plot_run.py runs/demo --metrics loss_image valid/loss --labels demo

Writes <metric>.png per metric (one line per run) and overview.png (every panel).
"""

from __future__ import annotations

import argparse
import sys

from megatron_t2i.experiments.plots import PANELS, PlotError, plot_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default="plots", help="output folder (default: plots)")
    parser.add_argument("--x", default="iteration", choices=["iteration", "samples", "tokens"])
    parser.add_argument("--metrics", nargs="+", default=None,
                        help=f"metrics to plot (default: {' '.join(m for m, _ in PANELS)})")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    args = parser.parse_args(argv)
    try:
        paths = plot_runs(args.runs, args.out, x=args.x, metrics=args.metrics,
                          labels=args.labels, log_y=args.log_y)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
