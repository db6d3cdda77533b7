"""Started by torchrun with 4 processes: TP=2 x PP=2 groups over gloo must be consistent."""

import sys

import torch
from megatron.core import parallel_state as ps

from megatron_t2i.config import ParallelConfig
from megatron_t2i.distributed import destroy_distributed, init_distributed


def check(tp: int, pp: int) -> None:
    env = init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp), device="cpu")
    assert env.launcher == "torchrun", env
    world = torch.distributed.get_world_size()
    dp = world // (tp * pp)
    assert ps.get_tensor_model_parallel_world_size() == tp
    assert ps.get_pipeline_model_parallel_world_size() == pp
    assert ps.get_data_parallel_world_size() == dp
    coords = torch.tensor([ps.get_tensor_model_parallel_rank(),
                           ps.get_pipeline_model_parallel_rank(),
                           ps.get_data_parallel_rank()])
    gathered = [torch.zeros_like(coords) for _ in range(world)]
    torch.distributed.all_gather(gathered, coords)
    # Every rank holds a distinct (tp, pp, dp) position and the positions cover the grid.
    assert len({tuple(c.tolist()) for c in gathered}) == world, gathered

    tp_group = ps.get_tensor_model_parallel_group()
    members = torch.distributed.get_process_group_ranks(tp_group)
    assert env.rank in members and len(members) == tp
    value = torch.tensor([float(env.rank + 1)])
    torch.distributed.all_reduce(value, group=tp_group)
    assert value.item() == sum(r + 1 for r in members), (value, members)
    for r, c in enumerate(gathered):  # members of my TP group share my pp and dp position
        if r in members:
            assert c[1:].tolist() == coords[1:].tolist(), (r, c, coords)
    print(f"OK rank={env.rank} tp={coords[0].item()} pp={coords[1].item()} "
          f"dp={coords[2].item()} tp_group={members}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    check(int(sys.argv[1]), int(sys.argv[2]))
