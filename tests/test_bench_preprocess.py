"""The preprocessing benchmark: preprocessing's own decode workers feed the MoVQGAN encoder
through a DataLoader, and the report's verdict and projection follow from its measured rates."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_preprocess",
                                                  REPO / "tools" / "bench_preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_workers_feed_the_encoder_and_the_report_adds_up():
    args = argparse.Namespace(preset="67M", device="cpu", image_size=32, batch=2, batches=3,
                              images=4, workers=2, corpus=1_000_000, devices=4)
    r = _tool().measure(args)
    assert min(r["decode_images_per_s_per_core_256px"], r["encode_images_per_s"],
               r["pipeline_images_per_s"]) > 0
    # every record of the corpus went through a worker and the encoder (but the warm-up chunk)
    assert r["pipeline_images"] == r["corpus_records"] - args.batch > 0
    feed = r["decode_images_per_s_per_core_at_size"] * args.workers
    assert r["bottleneck"] == ("decoding" if feed < r["encode_images_per_s"] else "encoder")
    hours = args.corpus / (r["pipeline_images_per_s"] * args.devices) / 3600
    assert abs(r["projected_hours"] - hours) <= 0.05 + 0.01 * hours
