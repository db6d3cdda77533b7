"""Started by mpirun: find rank and rendezvous through MPI, then all-reduce over gloo."""

import torch

from megatron_t2i.config import ParallelConfig
from megatron_t2i.distributed import destroy_distributed, detect_launch_env, init_distributed

if __name__ == "__main__":
    detected = detect_launch_env()
    assert detected.launcher == "mpi", detected
    env = init_distributed(ParallelConfig(tensor_model_parallel_size=1), device="cpu")
    assert (env.rank, env.world_size) == (detected.rank, detected.world_size), (env, detected)
    value = torch.tensor([float(env.rank + 1)])
    torch.distributed.all_reduce(value)
    expected = env.world_size * (env.world_size + 1) / 2
    assert value.item() == expected, (value, expected)
    print(f"OK rank={env.rank} world={env.world_size} local={env.local_rank} "
          f"master={env.master_addr}:{env.master_port} sum={value.item()}", flush=True)
    destroy_distributed()
