"""tools/plot_run.py: runs' metrics.jsonl to PNG charts (pretrained vs random init, image loss
against tokens seen), a resumed run's repeated iterations, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from PIL import Image

from megatron_t2i.experiments.plots import plot_runs
from megatron_t2i.training.run_log import PlotError, load_run, series

pytest.importorskip("matplotlib")


def _write_run(run_dir: Path, records: list[dict], seq_length: int = 96) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"seq_length": seq_length}}))
    lines = [json.dumps({"split": "train", "time": 0.0, **r}) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def _records(image_losses: list[float | None], batch: int = 32) -> list[dict]:
    return [{"iteration": i, "consumed_samples": i * batch, "loss": 5.0 - 0.1 * i,
             "loss_image": loss, "lr": 1e-3, "tokens_per_sec": 1000.0 + i}
            for i, loss in enumerate(image_losses, start=1)]


@pytest.fixture
def two_runs(tmp_path):
    pretrained = _write_run(tmp_path / "pretrained", _records([6.0, 5.0, 4.5, 4.2]))
    random_init = _write_run(tmp_path / "random_init", _records([6.2, 5.6, None, 4.9]))
    return pretrained, random_init


def test_image_loss_against_tokens_seen(two_runs, tmp_path):
    pretrained, random_init = two_runs
    xs, ys = series(load_run(pretrained), "loss_image", x="tokens")
    assert xs == [32 * 96, 64 * 96, 96 * 96, 128 * 96]  # consumed samples x seq_length
    assert ys == [6.0, 5.0, 4.5, 4.2]
    xs, ys = series(load_run(random_init), "loss_image", x="tokens")
    assert len(xs) == 3 and ys == [6.2, 5.6, 4.9]  # the NaN (null) is a gap, not a zero

    paths = plot_runs([pretrained, random_init], tmp_path / "plots", x="tokens")
    names = {p.name for p in paths}
    assert {"loss.png", "loss_image.png", "lr.png", "tokens_per_sec.png",
            "overview.png"} == names  # only the metrics the runs have
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_resumed_run_keeps_the_later_line_of_a_repeated_iteration(tmp_path):
    # resumed from a checkpoint at iteration 2 after logging iteration 3: 3 is logged twice
    records = _records([6.0, 5.0, 9.9]) + _records([6.0, 5.0, 4.5, 4.2])[2:]
    run = load_run(_write_run(tmp_path / "resumed", records))
    assert series(run, "loss_image") == ([1, 2, 3, 4], [6.0, 5.0, 4.5, 4.2])


def test_command_line(two_runs, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_run.py"), *map(str, two_runs), "--out",
         str(out), "--metrics", "loss_image", "--labels", "pretrained", "random init"],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["loss_image.png", "overview.png"]

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"),
                           str(two_runs[0]), "--metrics", "mfu", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "no run has mfu; metrics found: consumed_samples, loss, loss_image, lr" in proc.stderr


def test_bad_inputs_name_the_file(tmp_path, two_runs):
    with pytest.raises(PlotError, match="no metrics.jsonl"):
        load_run(tmp_path / "missing")
    broken = _write_run(tmp_path / "broken", _records([6.0]))
    with open(broken / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(PlotError, match=r"broken/metrics.jsonl:2: not a metrics record"):
        load_run(broken)
    (two_runs[0] / "config.yaml").unlink()
    with pytest.raises(PlotError, match="needs model.seq_length"):
        plot_runs([two_runs[0]], tmp_path / "p", x="tokens")
    with pytest.raises(PlotError, match="1 labels for 2 runs"):
        plot_runs(list(two_runs), tmp_path / "p", labels=["a"])
