"""`<run_dir>/loss.png` at the end of a run: text, image and validation loss against iterations.

Drawn with PIL (a runtime dependency) rather than matplotlib (the `plot` extra), so the
demo's first command, which installs the runtime only, still leaves a picture of its loss.
tools/plot_run.py draws the full dashboard panels with matplotlib.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_t2i.training.run_log import load_run, series

# (metric, legend, colour)
CURVES = (("loss_text", "train text", (214, 96, 28)),
          ("loss_image", "train image", (31, 119, 180)),
          ("valid/loss", "validation", (44, 160, 44)))
_SIZE = (640, 400)
_MARGIN = (56, 16, 16, 36)  # left, top, right, bottom


def write_loss_plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's losses (log scale) into `out` (default `<run_dir>/loss.png`)."""
    from PIL import Image, ImageDraw

    run = load_run(run_dir)
    curves = [(label, colour, *series(run, metric)) for metric, label, colour in CURVES]
    curves = [c for c in curves if c[2]]
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    box = (left, top, _SIZE[0] - right, _SIZE[1] - bottom)
    draw.rectangle(box, outline="black")
    points = [(x, y) for c in curves for x, y in zip(c[2], c[3]) if y > 0]
    if points:
        xs, ys = zip(*points)
        to_px = _axes(box, (min(xs), max(xs)), (min(ys), max(ys)), draw)
        for k, (label, colour, cx, cy) in enumerate(curves):
            line = [to_px(x, y) for x, y in zip(cx, cy) if y > 0]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            elif line:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2,
                              line[0][1] + 2], fill=colour)
            draw.text((box[2] - 110, box[1] + 6 + 14 * k), f"- {label}", fill=colour)
    draw.text((left, _SIZE[1] - 16), "iteration", fill="black")
    draw.text((4, 2), "loss (log scale)", fill="black")
    path = Path(out) if out is not None else Path(run_dir) / "loss.png"
    image.save(path)
    return path


def _axes(box: tuple[int, int, int, int], xr: tuple[float, float], yr: tuple[float, float],
          draw):
    """Tick labels on both axes; returns the data -> pixel mapping (log y)."""
    x0, x1 = xr[0], max(xr[1], xr[0] + 1)
    y0, y1 = math.log(yr[0]), math.log(max(yr[1], yr[0] * 1.01))

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0])
        py = box[3] - (math.log(y) - y0) / (y1 - y0) * (box[3] - box[1])
        return px, py

    for k in range(5):
        x = x0 + (x1 - x0) * k / 4
        px, _ = to_px(x, math.exp(y0))
        draw.line([(px, box[3]), (px, box[3] + 4)], fill="black")
        draw.text((px - 10, box[3] + 6), f"{x:.0f}", fill="black")
        y = math.exp(y0 + (y1 - y0) * k / 4)
        _, py = to_px(x0, y)
        draw.line([(box[0] - 4, py), (box[0], py)], fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black")
    return to_px
