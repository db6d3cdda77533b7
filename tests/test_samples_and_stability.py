"""What the model learned, shown during training, and the stability features of AR image
models: end-of-run samples and fidelity, guidance (warning, image-only sampling, `[eoi]`
forced), the vocab-parallel z-loss, QK layernorm under TP / PP, EMA weights that resume
exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, read_metrics, run_train, train_env

from megatron_t2i.config import Config
from megatron_t2i.eval.generate import SamplingParams, next_image_ids, warn_if_unguidable
from megatron_t2i.vocab import VocabLayout


def _python(args: list[str], nproc: int = 1) -> str:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=train_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout.strip().splitlines()[-1]


# ---- guidance and the image block ----------------------------------------------------------

def test_guidance_from_a_run_without_caption_dropout_warns():
    cfg = Config()
    cfg.data.caption_dropout = 0.0
    assert "data.caption_dropout=0" in warn_if_unguidable(cfg, 3.0)
    assert warn_if_unguidable(cfg, 1.0) is None  # no guidance, nothing to warn about
    cfg.data.caption_dropout = 0.1
    assert warn_if_unguidable(cfg, 3.0) is None


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_image_only_top_k_never_emits_a_text_id(guidance_scale):
    layout = VocabLayout(text_size=128, image_size=256, bos_id=1, eod_id=2)
    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    logits[:, :layout.image_start] += 50.0  # text ids (and specials) far more likely
    logits[:, layout.specials_start:] += 50.0
    ids = next_image_ids(logits, layout, SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
                         torch.Generator().manual_seed(1), guidance_scale)
    rows = 64 if guidance_scale == 1.0 else 32  # guided: captions then their null captions
    assert ids.shape == (rows,)
    assert ((ids >= layout.image_start) & (ids < layout.specials_start)).all()


def test_image_block_holds_codes_and_ends_with_a_forced_eoi(eval_checkpoint):
    out = json.loads(_python(["tests/scripts/image_block.py",
                              str(eval_checkpoint / "checkpoints")]))
    layout = VocabLayout.from_dict(out["layout"])
    for name in ("plain", "guided", "interval"):
        block = np.array(out[name])
        assert block.shape == (2, out["tokens_per_image"] + 1), name
        assert (block[:, -1] == layout.eoi_id).all(), name
        codes = block[:, :-1]
        assert ((codes >= layout.image_start) & (codes < layout.specials_start)).all(), name


# ---- z-loss and QK layernorm ---------------------------------------------------------------

def test_z_loss_at_tp2_equals_the_direct_computation_on_gathered_logits():
    got = json.loads(_python(["tests/scripts/zloss_tp.py"], nproc=2))
    assert got["parallel"] == pytest.approx(got["direct"], rel=1e-5)
    assert got["z_parallel"] == pytest.approx(got["z_direct"], rel=1e-5)
    assert got["grad_error"] < 1e-4  # the gradient of this rank's vocabulary slice
    assert got["count"] == 8


STABLE = ["train.z_loss_weight=0.01", "model.qk_layernorm=true", "train.eval_interval=3"]


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory, corpus_dir):
    run_dir = tmp_path_factory.mktemp("stable_tp1")
    run_train(run_dir, corpus_dir, overrides=STABLE)
    return run_dir


@pytest.mark.parametrize("nproc,layout", [(2, "parallel.tensor_model_parallel_size=2"),
                                          (2, "parallel.pipeline_model_parallel_size=2")])
def test_z_loss_and_qk_layernorm_match_single_process(nproc, layout, stable_run, tmp_path,
                                                      corpus_dir):
    run_train(tmp_path, corpus_dir, nproc=nproc, overrides=[*STABLE, layout])
    got = read_metrics(tmp_path)
    ref = read_metrics(stable_run)
    # z = logsumexp^2 near log(512)^2 at initialisation, logged apart from the loss
    assert 30 < ref[0]["z_loss"] < 45
    for key in ("loss", "loss_image", "z_loss"):
        assert got[0][key] == pytest.approx(ref[0][key], rel=1e-5), key
        assert got[2][key] == pytest.approx(ref[2][key], rel=1e-4), key
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-4)


# ---- EMA and end-of-run samples ------------------------------------------------------------

def test_ema_averages_in_fp32_and_swaps_back():
    from megatron_t2i.training.ema import EMA as Average

    model = torch.nn.Linear(3, 2)
    start = model.weight.detach().clone()
    average = Average([model], decay=0.75)
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update([model])
    with average.applied([model]):
        torch.testing.assert_close(model.weight.detach(), start + 1.0)  # 0.75 x 0 + 0.25 x 4
    torch.testing.assert_close(model.weight.detach(), start + 4.0)  # the trained weights back
    assert all(s.dtype == torch.float32 for s in average.shadow[0])


EMA = [*STABLE, "train.ema_decay=0.5", "train.sample_at_end=true", "train.sample_count=3",
       "logging.tensorboard=true"]  # 3 iterations, validation at the last


def test_ema_resumes_exactly_and_end_of_run_samples_are_deterministic(stable_run, tmp_path,
                                                                      corpus_dir):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_train(whole, corpus_dir, overrides=EMA)
    run_train(parts, corpus_dir, overrides=[*EMA, "train.exit_interval=2"])
    assert not (parts / "samples").exists()  # stopped early: not the end of the run
    run_train(parts, corpus_dir, overrides=EMA)
    # validation runs on the averaged weights: equal only if the average resumed exactly
    valid = read_metrics(whole, "valid")[-1], read_metrics(parts, "valid")[-1]
    assert valid[0]["iteration"] == valid[1]["iteration"] == 3
    assert valid[0]["loss"] == valid[1]["loss"]
    # the same run without the average validates other weights
    assert read_metrics(stable_run, "valid")[-1]["loss"] != valid[0]["loss"]
    meta = json.loads((whole / "checkpoints" / "iter_0000003" / "meta.json").read_text())
    assert meta["has_ema"] is True
    samples = [np.load(run / "samples" / "iter_3.npz") for run in (whole, parts)]
    assert samples[0]["codes"].shape == (3, 64)
    np.testing.assert_array_equal(samples[0]["codes"], samples[1]["codes"])
    assert len(set(map(str, samples[0]["captions"]))) == 3  # held-out test-split captions
    fidelity = json.loads((whole / "samples" / "fidelity.json").read_text())
    assert fidelity["iteration"] == 3 and fidelity["num_images"] == 3
    assert fidelity == json.loads((parts / "samples" / "fidelity.json").read_text())
    assert (whole / "samples" / "iter_3.png").stat().st_size > 0
    assert (whole / "loss.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(whole / "tensorboard"))
    events.Reload()
    assert "samples" in events.Tags()["images"]
