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

REPORT_KEYS = ("loss", "loss_text", "loss_image")


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
