"""The vocab-parallel z-loss and cross entropy against a direct computation on the gathered
logits: values and gradients of this rank's vocabulary slice; prints JSON from rank 0.

    torchrun --nproc_per_node 2 zloss_tp.py      (TP = the number of processes)
"""

import json

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_t2i.config import ParallelConfig
from megatron_t2i.distributed import destroy_distributed, init_distributed
from megatron_t2i.training.zloss import z_loss_func


def main() -> None:
    world = int(__import__("os").environ["WORLD_SIZE"])
    init_distributed(ParallelConfig(tensor_model_parallel_size=world), "cpu")
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(0)
    full = (torch.randn(2, 5, 8 * world, generator=gen) * 4).requires_grad_()  # [b, s, v]
    labels = torch.randint(0, 8 * world, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    modality = torch.zeros(2, 5, dtype=torch.int64)
    weight = 0.3
    # direct: gathered logits, plain torch
    ce = F.cross_entropy(full.transpose(1, 2), labels, reduction="none")
    z = torch.logsumexp(full, dim=-1) ** 2
    direct = ((ce + weight * z) * mask).sum()
    direct.backward()
    # vocab-parallel: this rank's slice only
    local = full.detach()[..., rank * 8:(rank + 1) * 8].clone().requires_grad_()
    total, count, report = z_loss_func(local, labels, mask, modality, weight)
    total.backward()
    result = {"direct": direct.item(), "parallel": total.item(),
              "z_direct": (z * mask).sum().item(), "z_parallel": report["z"][0].item(),
              "grad_error": (local.grad - full.grad[..., rank * 8:(rank + 1) * 8]).abs().max()
              .item(), "count": int(count)}
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
