"""Process groups from whichever launcher started us: torchrun, srun (Slurm), mpirun, or none.

    env = init_distributed(cfg.parallel, platform.device_type)
    ...
    destroy_distributed()

The launcher only has to start the processes; this module finds out who is who (rank, world
size, local rank, where rank 0 listens), exports the variables torch's `env://` rendezvous
reads, starts the default process group (backend: `parallel.distributed_backend`, "auto"
resolved by the platform) and then megatron-core's tensor / pipeline / data-parallel groups.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import socket
from datetime import timedelta
from typing import Literal

import torch

from megatron_t2i.config import ParallelConfig
from megatron_t2i.platform import resolve_backend

Launcher = Literal["torchrun", "slurm", "mpi", "single"]

# Ports derived from a Slurm job id land here: above the well-known and common service ports,
# below Linux's ephemeral range (32768-60999), so they do not collide with outgoing sockets.
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 15000


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Who this process is in the job, and where rank 0's rendezvous store listens."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher


# ---- launcher detection ------------------------------------------------------------------

def detect_launch_env() -> LaunchEnv:
    """Read the launcher's variables; no process group is started.

    torchrun sets RANK/WORLD_SIZE itself, so it wins even inside a Slurm job. An MPI launcher
    comes before Slurm because `mpirun` inside an sbatch allocation hands every rank the batch
    step's SLURM_PROCID=0; its own per-rank variables are the truth there.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _torchrun_env()
    # srun --mpi=pmi2 sets PMI_RANK too; without mpi4py, Slurm's own variables serve there.
    if ("OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env) and (
        _mpi4py_importable() or "SLURM_PROCID" not in env
    ):
        return _mpi_env()
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _slurm_env()
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "localhost"),
                     int(env.get("MASTER_PORT") or _free_port()), "single")


def _torchrun_env() -> LaunchEnv:
    env = os.environ
    return LaunchEnv(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        master_addr=env.get("MASTER_ADDR", "localhost"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        launcher="torchrun",
    )


def _slurm_env() -> LaunchEnv:
    """srun starts every task itself; rank 0 runs on the first node of the step."""
    env = os.environ
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST") or "localhost")
    return LaunchEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=int(env["SLURM_NTASKS"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
        master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0"))),
        launcher="slurm",
    )


def slurm_port(job_id: str) -> int:
    """A port every task of a job computes alike, different for jobs that share a node."""
    return _SLURM_PORT_BASE + int(job_id) % _SLURM_PORT_SPAN


def _mpi4py_importable() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def _mpi_env() -> LaunchEnv:
    """Ask MPI for rank and size; rank 0 tells everyone where its rendezvous store listens."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("started by an MPI launcher (OMPI_COMM_WORLD_RANK / PMI_RANK set) "
                           "but mpi4py is not installed: pip install 'megatron_t2i[mpi]'") from None
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    hostname = socket.gethostname()
    proposal = None
    if rank == 0:
        proposal = (os.environ.get("MASTER_ADDR") or hostname,
                    int(os.environ.get("MASTER_PORT") or _free_port()), hostname)
    master_addr, master_port, master_host = comm.bcast(proposal, root=0)
    if master_host == hostname and not os.environ.get("MASTER_ADDR"):
        # Same machine as rank 0: loopback works even where the hostname does not resolve.
        master_addr = "127.0.0.1"
    return LaunchEnv(rank, world_size, local_rank, master_addr, master_port, "mpi")


def _free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- Slurm host lists --------------------------------------------------------------------

_BRACKET = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list, without calling scontrol (absent in containers).

    `gpu[3,5-7],cpu01` -> `gpu3`; `rack1-node[003-010]` -> `rack1-node003` (padding kept,
    since the lower bound is used as written).
    """
    head = _first_item(nodelist.strip())
    if not head:
        raise ValueError(f"empty Slurm host list: {nodelist!r}")
    # Each bracket holds comma-separated numbers or ranges; the first one starts the list.
    host = _BRACKET.sub(lambda m: m.group(1).split(",")[0].split("-")[0].strip(), head)
    if "[" in host or "]" in host or not host:
        raise ValueError(f"cannot parse Slurm host list: {nodelist!r}")
    return host


def _first_item(nodelist: str) -> str:
    """Everything before the first comma that is outside brackets."""
    depth = 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            return nodelist[:i]
    return nodelist


# ---- process groups ----------------------------------------------------------------------

def init_distributed(parallel_cfg: ParallelConfig, device: Literal["cuda", "cpu"]) -> LaunchEnv:
    """Start torch.distributed and megatron-core's model-parallel groups (seeding is the
    trainer's, after this)."""
    launch = detect_launch_env()
    _export_env(launch)
    if device == "cuda":
        # Before the process group, so NCCL binds each rank to its own GPU.
        torch.cuda.set_device(launch.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=resolve_backend(parallel_cfg.distributed_backend, device),
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=parallel_cfg.distributed_timeout_minutes),
        )
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=parallel_cfg.distributed_timeout_minutes,
    )
    return launch


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default group, so a process can start over."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _restore_env()


# What the environment held before _export_env, so destroy_distributed can put it back and a
# later detect_launch_env sees the real launcher, not the torchrun-style variables we wrote.
_saved_env: dict[str, str | None] = {}


def _export_env(launch: LaunchEnv) -> None:
    """torch's env:// rendezvous and megatron-core read these, whatever the launcher was."""
    exported = {
        "RANK": str(launch.rank),
        "WORLD_SIZE": str(launch.world_size),
        "LOCAL_RANK": str(launch.local_rank),
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": str(launch.master_port),
    }
    for var in exported:
        _saved_env.setdefault(var, os.environ.get(var))
    os.environ.update(exported)


def _restore_env() -> None:
    for var, value in _saved_env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    _saved_env.clear()
