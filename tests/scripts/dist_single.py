"""Started as a plain process: a world of one, torn down and started again."""

import os

import torch
from megatron.core import parallel_state as ps

from megatron_t2i.config import ParallelConfig
from megatron_t2i.distributed import destroy_distributed, init_distributed

if __name__ == "__main__":
    for attempt in range(2):  # the second round proves destroy_distributed leaves nothing behind
        env = init_distributed(ParallelConfig(), device="cpu")
        assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1), env
        assert torch.distributed.get_backend() == "gloo"
        assert ps.get_data_parallel_world_size() == 1
        value = torch.ones(2)
        torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
        assert value.tolist() == [1.0, 1.0]
        destroy_distributed()
        assert not torch.distributed.is_initialized() and not ps.model_parallel_is_initialized()
        assert "RANK" not in os.environ, "destroy_distributed must restore the environment"
        print(f"OK rank=0 attempt={attempt} port={env.master_port}", flush=True)
