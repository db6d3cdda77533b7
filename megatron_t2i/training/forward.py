"""The forward step that training, validation and the evaluation tools share.

megatron-core's `get_forward_backward_func` calls `forward_step(data_iterator, model)` once
per microbatch and the returned loss function on the last pipeline stage's output. The loss
function is the training loss (training/loss.py `modality_loss`) unless an evaluation asks for
another one over the same per-token cross entropy (eval/forgetting.py's log-likelihoods); with
`train.z_loss_weight` the model returns vocab-parallel logits and training/zloss.py computes
the cross entropy and the z-loss from them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_t2i.training.loss import modality_loss
from megatron_t2i.training.zloss import z_loss_func

# loss_for_batch(per-token loss [b, s], batch) -> (loss sum, token count, report dict)
LossForBatch = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple]


def forward_step(data_iterator: Iterator, model: torch.nn.Module,
                 loss_for_batch: LossForBatch = modality_loss, z_loss_weight: float = 0.0
                 ) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
    """One microbatch through the model: (output, the loss function of that output)."""
    batch = next(data_iterator)
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=None, labels=None if z_loss_weight else batch["labels"])
    if z_loss_weight:
        return output, functools.partial(z_loss_func, labels=batch["labels"],
                                         loss_mask=batch["loss_mask"],
                                         modality=batch["modality"], weight=z_loss_weight)
    return output, functools.partial(loss_for_batch, batch=batch)


def forward_backward(model: list[torch.nn.Module], iterators: list[Iterator],
                     num_microbatches: int, seq_length: int, micro_batch_size: int,
                     forward_only: bool, loss_for_batch: LossForBatch = modality_loss,
                     z_loss_weight: float = 0.0) -> list[dict[str, Any]]:
    """megatron-core's schedule (no pipelining, 1F1B or interleaved) over the microbatches;
    the loss functions' reports, one per microbatch, on the last pipeline stage."""
    step = functools.partial(forward_step, loss_for_batch=loss_for_batch,
                             z_loss_weight=z_loss_weight)
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
