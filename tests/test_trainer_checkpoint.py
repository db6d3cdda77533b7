"""Checkpoints: exact resume, resume under another TP/PP, crash safety, refused checkpoints."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO, read_metrics, run_train, train_env

FOUR = ["train.train_iters=4"]
FAULT_SCRIPT = REPO / "tests/scripts/train_with_fault.py"  # kills the job at a given point


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train(run_dir, corpus_dir, overrides=FOUR)
    return read_metrics(run_dir)


def _losses(records, iterations):
    by_iter = {r["iteration"]: r for r in records}
    return [(by_iter[i]["loss"], by_iter[i]["loss_text"], by_iter[i]["loss_image"])
            for i in iterations]


def test_restart_resumes_exactly(tmp_path, corpus_dir, uninterrupted):
    run_train(tmp_path, corpus_dir, overrides=FOUR + ["train.exit_interval=2"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "2"
    proc = run_train(tmp_path, corpus_dir, overrides=FOUR)  # the same command again
    assert "resumed from" in proc.stdout
    resumed = read_metrics(tmp_path)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    # bit-for-bit on the CPU: model, optimizer, LR schedule and data position all restored
    assert _losses(resumed, [3, 4]) == _losses(uninterrupted, [3, 4])
    assert [r["lr"] for r in resumed[2:]] == [r["lr"] for r in uninterrupted[2:]]
    assert resumed[-1]["consumed_samples"] == uninterrupted[-1]["consumed_samples"]
    meta = (tmp_path / "checkpoints" / "iter_0000004" / "meta.json").read_text()
    assert '"vocab"' in meta and '"padded_vocab_size": 512' in meta


@pytest.mark.parametrize("nproc,layout", [
    (1, []),
    (2, ["parallel.pipeline_model_parallel_size=2"]),
], ids=["tp2_to_tp1", "tp2_to_pp2"])
def test_resume_under_another_layout(nproc, layout, tmp_path_factory, corpus_dir,
                                     uninterrupted):
    saved = tmp_path_factory.getbasetemp() / "saved_tp2"
    if not (saved / "checkpoints" / "latest").exists():
        run_train(saved, corpus_dir, nproc=2, overrides=FOUR + [
            "train.exit_interval=2", "parallel.tensor_model_parallel_size=2"])
    run_dir = tmp_path_factory.mktemp("resharded")
    shutil.copytree(saved / "checkpoints", run_dir / "checkpoints")
    proc = run_train(run_dir, corpus_dir, nproc=nproc, overrides=FOUR + layout)
    assert "resumed from" in proc.stdout
    got = read_metrics(run_dir)
    assert [r["iteration"] for r in got] == [3, 4]
    for mine, ref in zip(_losses(got, [3, 4]), _losses(uninterrupted, [3, 4])):
        assert mine == pytest.approx(ref, rel=1e-4)


def test_latest_survives_a_save_killed_half_way(tmp_path, corpus_dir, uninterrupted):
    overrides = FOUR + ["checkpoint.save_interval=2"]
    proc = run_train(tmp_path, corpus_dir, overrides=overrides, check=False,
                     env=train_env(MEGATRON_T2I_KILL_AT="save@4"), script=FAULT_SCRIPT)
    assert proc.returncode != 0
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "2"
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    proc = run_train(tmp_path, corpus_dir, overrides=overrides)
    assert "resumed from" in proc.stdout and "iter_0000002" in proc.stdout
    assert (ckpt / "latest").read_text().strip() == "4"
    assert not (ckpt / "iter_0000004.tmp").exists()
    assert _losses(read_metrics(tmp_path), [4])[-1] == _losses(uninterrupted, [4])[0]


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path, corpus_dir):
    run_train(tmp_path, corpus_dir, overrides=["train.train_iters=1"])
    proc = run_train(tmp_path, corpus_dir, check=False,
                     overrides=["train.train_iters=2", "data.image_vocab_size=128"])
    assert proc.returncode == 1
    assert "vocabulary layout of checkpoint" in proc.stderr
    assert "image: [128, 384) vs [128, 256)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_latest_naming_a_missing_checkpoint_is_refused(tmp_path, corpus_dir):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("7\n")
    proc = run_train(tmp_path, corpus_dir, check=False)
    assert proc.returncode == 1
    assert "iteration 7" in proc.stderr and "iter_0000007" in proc.stderr


def test_pretrained_init_loads_model_only(tmp_path, corpus_dir):
    """checkpoint.pretrained starts a new run from another run's weights (at another TP)."""
    source = tmp_path / "source"
    run_train(source, corpus_dir, overrides=["train.train_iters=2", "train.eval_interval=2"])
    source_valid = read_metrics(source, split="valid")[-1]["loss"]
    target = tmp_path / "target"
    proc = run_train(target, corpus_dir, nproc=2, overrides=[
        "train.train_iters=1", "train.eval_interval=1", "optim.lr=0", "optim.min_lr=0",
        "parallel.tensor_model_parallel_size=2",
        f"checkpoint.pretrained={source / 'checkpoints'}"])
    assert "initialised the model from" in proc.stdout
    train = read_metrics(target)
    assert [r["iteration"] for r in train] == [1]  # a new run: iteration and data restart
    assert train[0]["consumed_samples"] == 8
    # with lr 0 the weights stay the source's: its validation loss comes back
    assert read_metrics(target, split="valid")[-1]["loss"] == pytest.approx(source_valid,
                                                                            rel=1e-5)


ASYNC = ["checkpoint.async_save=true"]


def test_async_save_killed_while_pending_resumes_exactly(tmp_path, corpus_dir, uninterrupted):
    """checkpoint.async_save: a job killed while the save of iteration 4 is being written
    leaves `latest` on the asynchronous save of iteration 2, from which the same command
    resumes bit for bit (the same losses as the uninterrupted synchronous run)."""
    overrides = FOUR + ASYNC + ["checkpoint.save_interval=2"]
    proc = run_train(tmp_path, corpus_dir, overrides=overrides, check=False,
                     env=train_env(MEGATRON_T2I_KILL_AT="async@4"), script=FAULT_SCRIPT)
    assert proc.returncode != 0
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "2"
    assert (ckpt / "iter_0000002" / "manifest.json").is_file()
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    proc = run_train(tmp_path, corpus_dir, overrides=overrides)
    assert "resumed from" in proc.stdout and "iter_0000002" in proc.stdout
    assert (ckpt / "latest").read_text().strip() == "4"
    assert not (ckpt / "iter_0000004.tmp").exists()
    resumed = read_metrics(tmp_path)[-2:]  # the killed run logged 3 and 4 too
    assert [r["iteration"] for r in resumed] == [3, 4]
    assert _losses(resumed, [3, 4]) == _losses(uninterrupted, [3, 4])
    assert [r["lr"] for r in resumed] == [r["lr"] for r in uninterrupted[2:]]


def test_sigterm_during_async_save_waits_publishes_and_exits_75(tmp_path, corpus_dir):
    """The signal arrives while the save of iteration 2 is being written (its writer sleeps
    2 s first): the job waits for it, publishes it and exits 75."""
    proc = run_train(tmp_path, corpus_dir, check=False, script=FAULT_SCRIPT,
                     overrides=FOUR + ASYNC + ["checkpoint.save_at=[2]"],
                     env=train_env(MEGATRON_T2I_KILL_AT="term@2"))
    assert proc.returncode == 75, proc.stderr[-2000:]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "2"
    assert (ckpt / "iter_0000002" / "manifest.json").is_file()
    assert not (ckpt / "iter_0000002.tmp").exists()
    out = proc.stdout
    assert out.index("SIGTERM received") < out.index("saved checkpoint")
