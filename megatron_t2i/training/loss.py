"""The loss: megatron's vocab-parallel cross entropy, masked, with text and image apart.

GPTModel(labels=...) returns the per-token cross entropy [b, s] computed by
`vocab_parallel_cross_entropy` over the TP-sharded logits. Here it is masked and summed; the
schedule runs with `calculate_per_token_loss=True`, so gradients are divided by the number of
loss tokens of the whole global batch (all microbatches and data-parallel ranks): `loss` is the
mean over every loss token of the global batch, and no microbatch weighs more than its tokens.

`loss_text` / `loss_image` are the same mean restricted to text-target / image-target tokens.
Each microbatch reports sums and counts; `reduce_reports` adds them up over microbatches and the
data-parallel group, so the means are exact whatever the split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# The losses every report, log line, dashboard and evaluation names; each has a token count
# `<key>_tokens` beside it.
REPORT_KEYS = ("loss", "loss_text", "loss_image")
TOKEN_KEYS = tuple(f"{key}_tokens" for key in REPORT_KEYS)


def modality_loss(per_token_loss: torch.Tensor, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`masked_loss` over a collated batch: the loss function training and evaluation share."""
    return masked_loss(per_token_loss, batch["loss_mask"], batch["modality"])


def masked_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The schedule's loss_func contract: (loss sum, token count, report)."""
    losses = per_token_loss.float()
    mask = loss_mask.float()
    image = mask * (modality == 1).float()
    text = mask - image
    total = (losses * mask).sum()
    count = mask.sum()
    report = torch.stack([
        total.detach(), count,
        (losses * text).sum().detach(), text.sum(),
        (losses * image).sum().detach(), image.sum(),
    ])
    return total, count.to(torch.int), {"sums": report}


def reduce_reports(reports: list[dict], group: dist.ProcessGroup | None) -> dict[str, float]:
    """Global means from the microbatch reports of this rank and its data-parallel peers."""
    if not reports:
        return {}
    sums = torch.stack([r["sums"] for r in reports]).sum(dim=0).double()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    out = {}
    for i, key in enumerate(REPORT_KEYS):
        total, count = sums[2 * i].item(), sums[2 * i + 1].item()
        out[key] = total / count if count > 0 else float("nan")
        out[f"{key}_tokens"] = count
    return out


def present_losses(report: dict[str, float]) -> dict[str, float]:
    """The report without the losses no token was counted for: a batch without image (or
    text) targets has no such loss, so it is absent from metrics.jsonl, stdout, TensorBoard
    and W&B rather than logged as NaN. The token counts stay."""
    return {k: v for k, v in report.items()
            if k.endswith("_tokens") or report.get(f"{k}_tokens", 1) > 0}


def reduce_z_loss(reports: list[dict], group: dist.ProcessGroup | None) -> float:
    """Mean z (training/zloss.py) over the global batch's loss tokens; NaN when it is off."""
    if not reports or "z" not in reports[0]:
        return float("nan")
    sums = torch.stack([r["z"] for r in reports]).sum(dim=0).double()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


def reduce_on_last_stage(reports: list[dict], device: torch.device | str,
                         z_loss: bool = False) -> dict[str, float]:
    """Loss means and token counts over the global batch, on every rank.

    Only the last pipeline stage holds the microbatch reports: it reduces them over the
    data-parallel group and broadcasts the result to the other stages. Every key of
    `REPORT_KEYS` and its `_tokens` count (and `z_loss` when asked) is present; a loss no
    token counted for is NaN (`present_losses` drops it for the logs)."""
    keys = [*REPORT_KEYS, *TOKEN_KEYS] + (["z_loss"] if z_loss else [])
    values = torch.zeros(len(keys), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        group = parallel_state.get_data_parallel_group()
        means = reduce_reports(reports, group)
        if z_loss:
            means["z_loss"] = reduce_z_loss(reports, group)
        values = torch.tensor([means.get(k, float("nan")) for k in keys], dtype=torch.float64)
    values = broadcast_from_last_stage(values, device)
    return dict(zip(keys, values.tolist()))


def broadcast_from_last_stage(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Every pipeline stage gets the last stage's values (same shape on every stage)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        values = values.to(device)
        dist.broadcast(values, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return values.cpu()
