"""Parallel layouts give the losses of the single-process run (fp32, gloo on the CPU).

The model is initialised parallel-invariantly from the seed, and every layout sees the same
global batches, so TP / PP / interleaved PP / DP may differ only by floating-point reduction
order.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import read_metrics, run_train

LAYOUTS = {
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "tp2_pp2": (4, ["parallel.tensor_model_parallel_size=2",
                    "parallel.pipeline_model_parallel_size=2"]),
    "pp2_interleaved": (2, ["parallel.pipeline_model_parallel_size=2",
                            "parallel.virtual_pipeline_model_parallel_size=2"]),
    "dp2_distributed_optimizer": (2, ["parallel.use_distributed_optimizer=true",
                                      "parallel.overlap_grad_reduce=true"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir):
    run_dir = tmp_path_factory.mktemp("tp1")
    run_train(run_dir, corpus_dir)
    return read_metrics(run_dir)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path, corpus_dir):
    nproc, overrides = LAYOUTS[name]
    proc = run_train(tmp_path, corpus_dir, nproc=nproc, overrides=overrides)
    got = read_metrics(tmp_path)
    # the startup line counts each parameter once whatever the layout (TP-replicated norms
    # and a tied output layer at PP > 1 were counted again)
    total = json.loads((tmp_path / "parameters.json").read_text())["total"]
    assert f"; {total:,} parameters (with embeddings)" in proc.stdout
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for key in ("loss", "loss_text", "loss_image"):
        assert got[0][key] == pytest.approx(reference[0][key], rel=1e-5), key
        assert got[2][key] == pytest.approx(reference[2][key], rel=1e-4), key
    assert got[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-4)
    # the model learns: three steps lower the loss
    assert got[2]["loss"] < got[0]["loss"]


def test_reference_losses_are_sane(reference):
    first = reference[0]
    # near-uniform predictions at initialisation: about log(padded vocabulary = 512)
    assert abs(first["loss"] - math.log(512)) < 0.5
    assert first["loss_text_tokens"] + first["loss_image_tokens"] == first["loss_tokens"]
    # 8 samples x 65 image targets (64 codes + <eoi>)
    assert first["loss_image_tokens"] == 8 * 65
    for key in ("tokens_per_sec", "tflops_per_gpu", "mfu", "data_wait_fraction", "lr",
                "consumed_samples"):
        assert key in first
    assert reference[-1]["consumed_samples"] == 3 * 8


def test_bf16_trains(tmp_path, corpus_dir):
    run_train(tmp_path, corpus_dir, overrides=["train.precision=bf16"])
    got = read_metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in got)
    assert got[-1]["loss"] < got[0]["loss"]
