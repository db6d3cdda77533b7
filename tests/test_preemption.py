"""Faults a cluster job meets: a preemption signal (save, exit 75, resume), a NaN/Inf that skips
the update or stops the run, and a rank that hangs (the others end with a message, not hang).
A kill -9 during a save is in test_trainer_checkpoint.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, TINY, read_metrics, run_train, train_env

from megatron_t2i.config import load_config
from megatron_t2i.training import faults


def _wait_for_metrics(run_dir: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until the first iteration is logged: the ranks are in the training loop."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert all(p.poll() is None for p in procs), "training ended before its first iteration"
        assert time.monotonic() < deadline, "no iteration logged in time"
        time.sleep(0.2)


def _train_cmd(run_dir: Path, corpus: Path, overrides: list[str]) -> list[str]:
    return ["-m", "megatron_t2i.train", "--config", str(REPO / "configs/demo.yaml"), *TINY,
            f"train.run_dir={run_dir}", f"data.cache_dir={corpus}", *overrides]


# ---- signals ---------------------------------------------------------------------------------

def test_signal_handler_sets_a_flag_and_restores():
    signals = faults.ExitSignals(["SIGUSR1", "sigterm"])
    before = signal.getsignal(signal.SIGUSR1)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # the process survives: only a flag is set
        assert signals.received == signal.SIGUSR1
        assert signals.agreed("cpu") == signal.SIGUSR1  # no process group: this rank's flag
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(ValueError, match="SIGFOO"):
        faults.ExitSignals(["SIGFOO"])


def test_unknown_exit_signal_is_refused(tmp_path, corpus_dir):
    proc = run_train(tmp_path, corpus_dir, check=False, overrides=["train.exit_signals=[SIGUSR9]"])
    assert proc.returncode == 2 and "train.exit_signals: 'SIGUSR9'" in proc.stderr


def test_sigterm_to_one_rank_saves_on_all_and_restart_resumes(tmp_path, corpus_dir):
    """launch/torchrun_local.sh with 2 ranks; SIGTERM reaches rank 1 only, and both save after
    the same iteration (their flags are all-reduced), both exit 75 (the one torchrun's teardown
    SIGTERMs too), the launcher exits 75, and the same command resumes."""
    overrides = ["train.train_iters=20"]
    cmd = ["bash", str(REPO / "launch" / "torchrun_local.sh"),
           *_train_cmd(tmp_path, corpus_dir, overrides)[2:]]
    env = train_env(PYTHON=sys.executable, NPROC="2")
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as job:
        try:
            _wait_for_metrics(tmp_path, [job])
            ranks = psutil.Process(job.pid).children()
            assert len(ranks) == 2
            rank1 = next(r for r in ranks if "LOCAL_RANK=1" in _environ(r))
            rank1.send_signal(signal.SIGTERM)
            out, err = job.communicate(timeout=240)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == faults.PREEMPTED_EXIT_CODE, err[-3000:]
    # both ranks' own exit codes: neither died of torchrun's teardown SIGTERM
    assert "ranks [0, 1] exited [75, 75]: every rank stopped after saving" in err, err[-3000:]
    stopped = re.search(r"SIGTERM received: saving at iteration (\d+) and stopping", out)
    assert stopped, out[-3000:] + err[-3000:]
    iteration = int(stopped.group(1))
    assert 0 < iteration < 20
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == str(iteration)
    assert read_metrics(tmp_path)[-1]["iteration"] == iteration

    proc = run_train(tmp_path, corpus_dir, nproc=2, overrides=overrides)
    assert f"resumed from {tmp_path / 'checkpoints' / f'iter_{iteration:07d}'}" in proc.stdout
    assert [r["iteration"] for r in read_metrics(tmp_path)] == list(range(1, 21))


def _environ(process: psutil.Process) -> str:
    return Path(f"/proc/{process.pid}/environ").read_text().replace("\0", " ")


# ---- NaN / Inf -------------------------------------------------------------------------------

def test_non_finite_loss_message_says_where():
    report = {"loss": float("nan"), "loss_text": 2.0, "loss_image": float("inf"),
              "loss_tokens": 10, "loss_text_tokens": 4, "loss_image_tokens": 6}
    message = faults.check_loss(report, iteration=7, consumed_samples=48)
    assert message == ("non-finite loss at iteration 7 (loss=nan, loss_image=inf; the batch "
                       "starts at consumed sample 48)")
    # no text tokens in this batch: its NaN mean is not a divergence
    assert faults.check_loss(dict(report, loss=1.0, loss_image=1.0, loss_text=float("nan"),
                                  loss_text_tokens=0), 7, 48) is None


# optim.lr=1e30: the first update blows the weights up and the second step's gradients overflow
DIVERGE = ["optim.lr=1e30", "train.train_iters=4"]


def test_nan_policy_stop_ends_the_run_with_a_message(tmp_path, corpus_dir):
    proc = run_train(tmp_path, corpus_dir, check=False, overrides=DIVERGE)
    assert proc.returncode == 1
    assert ("error: non-finite gradients at iteration 2 with a finite loss (the batch starts "
            "at consumed sample 8); train.nan_policy=stop ended the run") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1]


def test_nan_policy_skip_leaves_the_update_out(tmp_path, corpus_dir):
    proc = run_train(tmp_path, corpus_dir, overrides=DIVERGE + ["train.nan_policy=skip"])
    assert "update skipped (train.nan_policy=skip)" in proc.stdout
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [0, 1, 1, 1]
    assert records[1]["grad_norm"] is None  # NaN, written as JSON null
    # the NaN gradients never reached the parameters (the loss would be NaN from then on),
    # and the LR schedule did not advance
    assert all(r["loss"] is not None for r in records)
    assert records[1]["lr"] == records[2]["lr"] == records[3]["lr"]


# ---- a hung rank -----------------------------------------------------------------------------

def test_hung_rank_ends_the_job_with_a_message(tmp_path, corpus_dir):
    """Rank 1 is stopped (SIGSTOP) mid-training; rank 0's next collective times out after
    parallel.distributed_timeout_minutes and it exits 1 saying so. Both ranks are started as
    srun would start them (SLURM_PROCID/SLURM_NTASKS), with no launcher to kill anything."""
    overrides = ["train.train_iters=500", "parallel.distributed_timeout_minutes=0.25"]
    cfg = load_config(REPO / "configs/demo.yaml", [*TINY, f"data.cache_dir={corpus_dir}"])
    from megatron_t2i.data.demo import prepare_demo_corpus

    prepare_demo_corpus(cfg.data, cfg.train.seed)  # no rank waits on another for it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = train_env()  # (it drops launcher variables, so these go in after)
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        ranks.append(subprocess.Popen(
            [sys.executable, *_train_cmd(tmp_path, corpus_dir, overrides)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_metrics(tmp_path, ranks)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert ranks[0].returncode == 1, err[-3000:]
    assert ("a collective did not complete within parallel.distributed_timeout_minutes=0.25: "
            "another rank is hung or dead") in err
    assert 10 <= waited < 60  # the timeout, not a hang
