"""Shared fixtures: launching real training runs in subprocesses (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A small, fast variant of configs/demo.yaml for the trainer tests.
TINY = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=80", "data.image_tokens_per_sample=64", "data.synthetic_samples=600",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=3",
    "train.log_interval=1", "train.eval_interval=null", "optim.lr_warmup_iters=0",
    "logging.tensorboard=false", "checkpoint.save_interval=null",
    "train.sample_at_end=false", "train.sample_interval=null",  # tests that want samples turn them on
    "data.caption_dropout=0.0",  # the losses the tests compare see every caption
]


# What a launcher sets: removed so that an in-process world of one is not mistaken for a job.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")


@contextmanager
def world_of_one() -> Iterator[None]:
    """The CPU platform and a gloo world of one rank in this process (megatron-core asks for
    the parallel ranks), torn down and the launcher variables restored on exit."""
    from megatron_t2i.config import ParallelConfig
    from megatron_t2i.distributed import destroy_distributed, init_distributed
    from megatron_t2i.platform import select_platform, uninstall_cpu_compat

    saved = {v: os.environ.pop(v) for v in LAUNCH_VARS if v in os.environ}
    select_platform("cpu")
    init_distributed(ParallelConfig(), device="cpu")
    try:
        yield
    finally:
        destroy_distributed()
        uninstall_cpu_compat()
        os.environ.update(saved)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (or set T2I_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if not (config.getoption("--runslow") or os.environ.get("T2I_RUN_SLOW") == "1"):
        skip_slow = pytest.mark.skip(reason="slow: run with --runslow or T2I_RUN_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """One demo-corpus cache for the whole session (generated on first use)."""
    return tmp_path_factory.mktemp("corpus")


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        env.pop(var, None)
    return env


def run_train(run_dir: Path, corpus: Path, nproc: int = 1, overrides: list[str] = (),
              env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 300, script: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun -m megatron_t2i.train` (or plain python for one process) on the tiny config;
    `script`: a wrapper of that entry point instead (tests/scripts/train_with_fault.py)."""
    args = ["--config", str(REPO / "configs/demo.yaml"), *TINY,
            f"train.run_dir={run_dir}", f"data.cache_dir={corpus}", *overrides]
    entry = [str(script)] if script is not None else ["-m", "megatron_t2i.train"]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *entry, *args]
    # a session of its own: a timeout (or the job's own fault injection) ends every process
    # of the job, helpers that hold the output pipes included
    with subprocess.Popen(cmd, cwd=REPO, env=env or train_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            raise AssertionError(f"training timed out after {timeout}s:\n{out[-3000:]}\n"
                                 f"{err[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory, corpus_dir) -> Path:
    """A tiny model trained for a few iterations (validation logged at the last one), for the
    evaluation tools' tests. Returns its run folder (checkpoints under `checkpoints/`)."""
    run_dir = tmp_path_factory.mktemp("eval_run")
    run_train(run_dir, corpus_dir, overrides=["train.train_iters=6", "train.eval_interval=6",
                                              "train.eval_iters=2"])
    return run_dir
