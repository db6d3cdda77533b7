"""Started by torchrun with N processes, one GPU each: NCCL as the default backend of the CUDA
platform, megatron-core's tensor-parallel group of size N, and an all-reduce of CUDA tensors
over it (tests/test_gpu.py)."""

import sys

import torch
from megatron.core import parallel_state as ps

from megatron_t2i.config import ParallelConfig
from megatron_t2i.distributed import destroy_distributed, init_distributed


def check(tp: int) -> None:
    env = init_distributed(ParallelConfig(tensor_model_parallel_size=tp), device="cuda")
    assert torch.distributed.get_backend() == "nccl", torch.distributed.get_backend()
    assert torch.cuda.current_device() == env.local_rank
    group = ps.get_tensor_model_parallel_group()
    assert torch.distributed.get_backend(group) == "nccl"
    value = torch.full((1024,), float(env.rank + 1), device="cuda")
    torch.distributed.all_reduce(value, group=group)
    expected = float(sum(range(1, tp + 1)))
    assert torch.all(value == expected).item(), (value[:4], expected)
    print(f"OK rank={env.rank} backend=nccl tp={tp} sum={value[0].item()}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    check(int(sys.argv[1]))
