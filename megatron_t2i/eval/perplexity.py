"""Perplexity per modality, at any TP / PP, through the trainer's own forward path.

Samples go through megatron-core's `get_forward_backward_func` with `forward_only=True` and
the training loss (`training/loss.py` masked_loss / reduce_reports), so the numbers are the
validation losses the trainer logs: `loss_text` over caption targets (and `<boi>`),
`loss_image` over image codes and `<eoi>`; perplexity is exp of each. Data-parallel ranks
share the samples; the last pipeline stage's means are broadcast to every rank.

The same path scores a held-out text file (forgetting of text skills) and, with another loss
function, the per-sequence log-likelihoods of multiple-choice tasks (forgetting.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_t2i.config import Config
from megatron_t2i.data.documents import make_sample, make_text_document
from megatron_t2i.data.loader import build_data_pipeline, collate
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.training.forward import LossForBatch, forward_backward
from megatron_t2i.training.loss import (
    REPORT_KEYS,
    broadcast_from_last_stage,
    modality_loss,
    reduce_on_last_stage,
)
from megatron_t2i.vocab import VocabLayout

__all__ = ["broadcast_from_last_stage", "forward_reports", "modality_loss",
           "modality_perplexity"]

Sample = dict[str, torch.Tensor]  # tokens, labels, loss_mask, modality: each [seq_length]


def forward_reports(chunks: list[torch.nn.Module], samples: Sequence[Sample],
                    micro_batch_size: int, loss_for_batch: LossForBatch,
                    device: torch.device) -> list[dict]:
    """Run this rank's samples forward-only through the training forward step and schedule.

    All samples must have one length (the schedule's p2p buffers are sized from it); the
    count is padded to whole microbatches with samples whose loss mask is zero. Returns the
    loss function's reports, one per microbatch, on the last pipeline stage (empty elsewhere).
    """
    if not samples:
        return []
    seq_length = int(samples[0]["tokens"].shape[0])
    padded = list(samples) + [_empty_like(samples[0])] * (-len(samples) % micro_batch_size)
    batches = iter([collate(padded[i:i + micro_batch_size], device)
                    for i in range(0, len(padded), micro_batch_size)])
    with torch.no_grad():
        return forward_backward(chunks, [batches], len(padded) // micro_batch_size,
                                seq_length, micro_batch_size, forward_only=True,
                                loss_for_batch=loss_for_batch)


def _empty_like(sample: Sample) -> Sample:
    return {k: torch.zeros_like(v) for k, v in sample.items()}


def data_parallel_share(samples: Sequence[Sample]) -> list[Sample]:
    """This data-parallel rank's samples: every DP-th one, padded to an equal count."""
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    share = list(samples[rank::size])
    per_rank = -(-len(samples) // size)
    return share + [_empty_like(samples[0])] * (per_rank - len(share))


def modality_perplexity(chunks: list[torch.nn.Module], samples: Sequence[Sample],
                        micro_batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean losses and perplexities over all samples (all DP ranks together): the training
    loss and its last-stage reduction (training/loss.py)."""
    reports = forward_reports(chunks, data_parallel_share(samples), micro_batch_size,
                              modality_loss, device)
    out = reduce_on_last_stage(reports, device)
    for key in REPORT_KEYS:
        if out[f"{key}_tokens"]:
            out[key.replace("loss", "ppl")] = math.exp(out[key])
        else:  # no such tokens (e.g. images in a text file): null in the JSON report
            out[key] = out[key.replace("loss", "ppl")] = None
    return out


# ---- what to measure ------------------------------------------------------------------------

def validation_samples(cfg: Config, max_samples: int | None = None) -> list[Sample]:
    """The validation split of the run's data (the demo corpus or its token files)."""
    from megatron_t2i.eval.loading import eval_platform

    valid = build_data_pipeline(cfg, eval_platform(cfg)).valid
    n = len(valid) if max_samples is None else min(max_samples, len(valid))
    return [valid[i] for i in range(n)]


def text_file_samples(path: str | Path, tokenizer: TextTokenizer, layout: VocabLayout,
                      seq_length: int, max_samples: int | None = None) -> list[Sample]:
    """A held-out text file as fixed-length language-modelling samples.

    Each non-empty line is a document `[bos] text [eod]`; the documents are concatenated and
    cut into windows of seq_length + 1 tokens (the last one padded and masked), the usual way
    to measure a language model's perplexity on running text. Every target is text.
    """
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    stream: list[int] = []
    for line in filter(None, lines):
        stream += make_text_document(tokenizer.encode(line), layout).tolist()
    if not stream:
        raise ValueError(f"{path}: no text (every line is empty)")
    window = seq_length + 1
    samples = []
    for start in range(0, len(stream) - 1, seq_length):
        piece = np.asarray(stream[start:start + window], dtype=np.int64)
        samples.append(make_sample(piece, None, layout.pad_id, seq_length))
        if max_samples is not None and len(samples) >= max_samples:
            break
    return samples


# ---- the tool -------------------------------------------------------------------------------

def evaluate_perplexity(checkpoint: str | Path, tp: int = 1, pp: int = 1,
                        max_samples: int | None = None, text_file: str | Path | None = None,
                        text_tokenizer: str | Path | None = None,
                        micro_batch_size: int | None = None) -> dict:
    """The JSON report of tools/eval_perplexity.py: losses and perplexities per modality on
    the run's validation split, and on a held-out text file if one is given."""
    from megatron_t2i.eval import loading

    cfg, chunks, layout, _ = loading.load_for_eval(checkpoint, tp, pp)
    device = next(chunks[0].parameters()).device
    mbs = micro_batch_size or cfg.train.micro_batch_size
    report = {"checkpoint": str(checkpoint), "tp": tp, "pp": pp,
              "valid": modality_perplexity(chunks, validation_samples(cfg, max_samples), mbs,
                                           device)}
    if text_file is not None:
        tokenizer = loading.text_tokenizer_for(cfg, text_tokenizer)
        samples = text_file_samples(text_file, tokenizer, layout, cfg.model.seq_length,
                                    max_samples)
        report["text_file"] = dict(modality_perplexity(chunks, samples, mbs, device),
                                   file=str(text_file))
    return report
