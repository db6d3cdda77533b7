"""A real one-node Slurm cluster (tools/slurm_local_cluster.sh: munged, slurmctld, slurmd on
localhost) runs slurm/train_cpu.sbatch: `sbatch --wait` with 2 tasks, and a pre-timeout USR1
that saves, requeues the job and resumes it to the losses of the uninterrupted job."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, read_metrics, train_env

from megatron_t2i.config import load_config

CLUSTER = REPO / "tools" / "slurm_local_cluster.sh"
ITERS = 20
JOB = [*TINY, f"train.train_iters={ITERS}"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _why_no_slurm() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


needs_slurm = pytest.mark.skipif(_why_no_slurm() is not None, reason=str(_why_no_slurm()))


def _free_port_pair() -> int:
    """A port p with p + 1 free as well (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def slurm_env():
    """Start the cluster (installing slurm-wlm/munge when absent); stop it afterwards."""
    state = Path(tempfile.mkdtemp(prefix="t2i-slurm-"))
    state.chmod(0o755)  # munged runs as user munge and keeps its socket in here
    env = dict(os.environ, T2I_SLURM_DIR=str(state), T2I_SLURM_PORT=str(_free_port_pair()))
    proc = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = train_env(SLURM_CONF=str(state / "slurm.conf"), PYTHON=sys.executable)
    for var in [v for v in jobs if v.startswith("SLURM_") and v != "SLURM_CONF"]:
        jobs.pop(var)  # pytest itself may run inside a Slurm job
    yield jobs
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(state, ignore_errors=True)


def _sbatch(env: dict, out_dir: Path, overrides: list[str], *flags: str
            ) -> subprocess.CompletedProcess:
    cmd = ["sbatch", *flags, "--parsable", f"--output={out_dir}/slurm-%j.out",
           "slurm/train_cpu.sbatch", *JOB, f"train.run_dir={out_dir / 'run'}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env,
                         capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def _log(out_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out_dir.glob("slurm-*.out")))


def _losses(records: list[dict]) -> list[tuple]:
    return [(r["iteration"], r["loss"], r["loss_text"], r["loss_image"]) for r in records]


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, corpus_dir, tmp_path_factory):
    """`sbatch --wait` returns the job's status once it has finished."""
    out = tmp_path_factory.mktemp("sbatch_wait")
    proc = _sbatch(slurm_env, out, [f"data.cache_dir={corpus_dir}"], "--wait")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{_log(out)[-6000:]}"
    return out


@needs_slurm
def test_sbatch_wait_trains_two_tasks(uninterrupted):
    log = _log(uninterrupted)
    assert "world 2 = TP 1 x PP 1 x DP 2" in log  # two srun tasks, ranks from Slurm's env
    records = read_metrics(uninterrupted / "run")
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert records[-1]["loss"] < records[0]["loss"]
    ckpt = uninterrupted / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == str(ITERS)
    assert (ckpt / f"iter_{ITERS:07d}" / "meta.json").exists()


@needs_slurm
def test_pre_timeout_signal_saves_requeues_and_resumes(slurm_env, corpus_dir, tmp_path,
                                                       uninterrupted):
    """What `#SBATCH --signal=B:USR1@120` does near the time limit, sent now by hand."""
    wandb = importlib.util.find_spec("wandb") is not None
    overrides = [f"data.cache_dir={corpus_dir}"] + (["logging.wandb=true"] if wandb else [])
    proc = _sbatch(slurm_env, tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.monotonic() < deadline, _log(tmp_path)[-6000:]
            assert _job(slurm_env, job_id).get("JobState") not in FINISHED, _log(tmp_path)
            time.sleep(0.3)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env,
                       check=True)
        while (job := _job(slurm_env, job_id)).get("JobState") not in FINISHED:
            assert time.monotonic() < deadline, _log(tmp_path)[-6000:]
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env, capture_output=True)
    log = _log(tmp_path)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, log[-6000:])
    assert "SIGUSR1 received: saving at iteration" in log
    assert "requeueing job" in log and "resumed from" in log
    stopped_at = int(log.split("SIGUSR1 received: saving at iteration ")[1].split()[0])
    assert 0 < stopped_at < ITERS
    # each iteration logged once, and the losses of the job that was never interrupted
    assert _losses(read_metrics(tmp_path / "run")) == _losses(read_metrics(uninterrupted / "run"))
    if wandb:  # one W&B run, continued: both starts wrote offline files under the same id
        run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
        starts = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
        assert len(starts) == 2 and all(p.name.endswith(run_id) for p in starts), starts


# ---- the scripts' plumbing, without a cluster -------------------------------------------------

def test_sweep_lines_are_valid_overrides():
    sweep = REPO / "slurm" / "sweeps" / "t2i_init_and_freezing.txt"
    lines = [ln for ln in sweep.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for i, line in enumerate(lines):
        picked = subprocess.run(
            ["bash", "-c", 'source slurm/common.sh; t2i_sweep_line "$0" "$1"', str(sweep), str(i)],
            cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        assert picked == line.strip()
        load_config(REPO / "configs" / "openlm_1b_t2i.yaml", picked.split()[1:])


def test_array_task_gets_its_run_directory_and_overrides(tmp_path):
    """Task 2 of array job 41 runs the third sweep line after the command line's overrides."""
    env = dict(os.environ, SLURM_JOB_ID="43", SLURM_ARRAY_JOB_ID="41", SLURM_ARRAY_TASK_ID="2",
               SLURM_JOB_NAME="abl", SLURM_JOB_NODELIST="gpu[01-04]", SLURM_SUBMIT_DIR=str(REPO),
               SWEEP="slurm/sweeps/t2i_init_and_freezing.txt", T2I_RUNS=str(tmp_path))
    script = ('source slurm/common.sh; t2i_setup "$@" >/dev/null; '
              'printf "%s\\n" "$RUN_DIR" "$MASTER_PORT" "${T2I_OVERRIDES[@]}"')
    out = subprocess.run(["bash", "-c", script, "-", "checkpoint.pretrained=/ckpt/x"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    run_dir, port, *overrides = out.stdout.split()
    assert run_dir == f"{tmp_path}/abl-41-frozen_attention"
    assert port == str(15000 + 43)
    assert overrides == [f"train.run_dir={run_dir}", "logging.wandb_name=abl-41-frozen_attention",
                         "logging.wandb_group=abl-41", "checkpoint.pretrained=/ckpt/x",
                         "model.freeze=[attention]"]
    cfg = load_config(REPO / "configs" / "openlm_1b_t2i.yaml", overrides)
    assert cfg.model.freeze == ["attention"] and cfg.logging.wandb_group == "abl-41"


def test_sbatch_scripts_parse_and_torchrun_has_their_flags():
    for script in sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"],
                           capture_output=True, text=True, check=True).stdout
    text = (REPO / "slurm" / "train_torchrun.sbatch").read_text()
    for flag in ("--signals-to-handle", "--shutdown-timeout", "--rdzv-endpoint"):
        assert flag in text and flag in usage
    header = [ln for ln in (REPO / "slurm" / "train.sbatch").read_text().splitlines()
              if ln.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header


@pytest.mark.parametrize("step_status, requeued", [(75, True), (1, False), (0, False)])
def test_pre_timeout_signal_requeues_only_a_step_that_exited_75(tmp_path, step_status, requeued):
    """slurm/common.sh's t2i_step under USR1: passes the signal on to the job's steps
    (scancel), and requeues the job only when the step then exits 75 (the ranks saved). The
    cluster's scancel/scontrol are stand-ins that record their arguments; the real cluster
    runs the whole path in test_pre_timeout_signal_saves_requeues_and_resumes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scancel returns only after the step has exited (a slow controller): the batch shell's
    # `wait` then ends on the trap with 138 while the step's own status is 75, 1 or 0
    for tool, action in (("scancel", 'touch "$T2I_TEST/signalled"; sleep 0.5'),
                         ("scontrol", "true")):
        (bin_dir / tool).write_text(f'#!/bin/bash\necho "{tool} $*" >> "$T2I_TEST/calls"\n'
                                    f"{action}\n")
        (bin_dir / tool).chmod(0o755)
    # the step: a rank that exits with step_status once the signal reached it
    step = (f'touch "$T2I_TEST/started"; until [ -e "$T2I_TEST/signalled" ]; do sleep 0.05; '
            f"done; exit {step_status}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", T2I_TEST=str(tmp_path),
               SLURM_JOB_ID="77")
    job = subprocess.Popen(["bash", "-c", 'source slurm/common.sh; t2i_step bash -c "$0"', step],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == step_status, out
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "scancel --signal=USR1 77"
    assert (calls[1:] == ["scontrol requeue 77"]) is requeued, (calls, out)
    assert ("requeueing job 77" in out) is requeued
    if not requeued:
        assert f"not requeued: the step exited {step_status} after SIGUSR1, not 75" in out


@needs_slurm
def test_preprocess_sbatch_two_encoders_equal_one_process(slurm_env, tmp_path):
    """slurm/preprocess.sbatch with two srun tasks (CPU encoders, gloo) writes the bytes of a
    one-process run."""
    from test_preprocess_distributed import _args, _files, _tool, make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    assert _tool().main(_args(corpus, tmp_path / "one" / "t2i")) == 0
    out = tmp_path / "job" / "t2i"
    proc = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", "--cpus-per-task=1",
                           "--gpus-per-node=0", f"--output={tmp_path}/slurm-%j.out",
                           "slurm/preprocess.sbatch", *_args(corpus, out)],
                          cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=600)
    log = _log(tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log[-6000:]}"
    assert "2 encoders on" in log and log.count("wrote 36 documents") == 1
    assert _files(out) == _files(tmp_path / "one" / "t2i")
