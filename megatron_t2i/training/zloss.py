"""The output z-loss: `train.z_loss_weight` x mean over loss tokens of logsumexp(logits)^2.

It keeps the softmax normaliser near 1 (log Z near 0), against the logit drift that mixed
text-image training shows (Chameleon, Lumina-mGPT use weight 1e-4; PaLM introduced it). The
paper this project reproduces did not use it: off (0) by default.

The logits stay vocab-parallel: each tensor-parallel rank holds a slice of the vocabulary, so
logsumexp is the global max (all-reduce MAX, a constant shift, no gradient) plus the log of the
all-reduced sum of exponentials; megatron-core's `reduce_from_tensor_model_parallel_region`
all-reduces in the forward pass and passes the gradient through unchanged, which is the exact
gradient since every rank computes the same loss from the summed value. Nothing of size
vocabulary is gathered. The cross entropy is megatron-core's `vocab_parallel_cross_entropy`,
as in GPTModel's own loss.

Reported as `z_loss`: the mean of logsumexp^2 over the loss tokens of the global batch
(without the weight), reduced like the other losses (training/loss.py reduce_z_loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_t2i.training.loss import masked_loss


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the whole vocabulary of logits [..., vocab / TP] sharded over TP."""
    logits = logits.float()
    shift = logits.detach().max(dim=-1).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX,
                        group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = torch.exp(logits - shift.unsqueeze(-1)).sum(dim=-1)
    return torch.log(reduce_from_tensor_model_parallel_region(sum_exp)) + shift


def z_loss_func(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                modality: torch.Tensor, weight: float
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The schedule's loss_func for logits [b, s, vocab / TP]: cross entropy + weight x z."""
    z = vocab_parallel_logsumexp(logits) ** 2  # first: the cross entropy shifts logits in place
    cross_entropy = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    total, count, report = masked_loss(cross_entropy, loss_mask, modality)
    mask = loss_mask.float()
    z_sum = (z * mask).sum()
    report["z"] = torch.stack([z_sum.detach(), mask.sum()])
    return total + weight * z_sum, count, report

