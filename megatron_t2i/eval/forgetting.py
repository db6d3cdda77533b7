"""Forgetting of text skills (the paper's Table 1): what a language model still knows after
training on image tokens.

Three measures, all from local files (nothing is downloaded):
- perplexity on held-out text (perplexity.text_file_samples, at any TP / PP);
- greedy completions of a prompts file, one prompt per line (generation: PP = 1);
- multiple-choice accuracy by likelihood on jsonl files in the common layouts:
    HellaSwag  {"ctx": ..., "endings": [...], "label": 0}
    ARC        {"question": {"stem": ..., "choices": [{"text": ..., "label": "A"}, ...]},
                "answerKey": "A"}
    PIQA       {"goal": ..., "sol1": ..., "sol2": ..., "label": 0}
  Each choice is scored by the summed log-probability of its tokens after `[bos] context`;
  `acc` takes the best sum, `acc_norm` the best sum per character of the choice (as
  lm-evaluation-harness does), so long choices are not penalised for their length.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_t2i.eval.perplexity import (
    Sample,
    broadcast_from_last_stage,
    forward_reports,
)
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.vocab import VocabLayout


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int


# ---- task files -----------------------------------------------------------------------------

def read_choice_task(path: str | Path) -> list[ChoiceItem]:
    """A jsonl file in the HellaSwag, ARC or PIQA layout (detected per line)."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(_parse_item(json.loads(line)))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path}:{n}: not a HellaSwag (ctx, endings, label), ARC "
                             f"(question.stem, question.choices, answerKey) or PIQA (goal, "
                             f"sol1, sol2, label) record: {e}") from None
    if not items:
        raise ValueError(f"{path}: no records")
    return items


def _parse_item(record: dict[str, Any]) -> ChoiceItem:
    if "endings" in record:  # HellaSwag
        ctx = record.get("ctx") or f"{record['ctx_a']} {record.get('ctx_b', '')}".strip()
        return _item(ctx, record["endings"], int(record["label"]))
    if "question" in record:  # ARC
        q = record["question"]
        labels = [str(c["label"]) for c in q["choices"]]
        answer = labels.index(str(record["answerKey"]))
        return _item(f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]],
                     answer)
    if "goal" in record:  # PIQA
        return _item(f"Question: {record['goal']}\nAnswer:", [record["sol1"], record["sol2"]],
                     int(record["label"]))
    raise KeyError(f"unknown layout with keys {sorted(record)}")


def _item(context: str, choices: list[str], answer: int) -> ChoiceItem:
    if not 0 <= answer < len(choices):
        raise IndexError(f"answer {answer} is not one of {len(choices)} choices")
    return ChoiceItem(context, tuple(choices), answer)


# ---- scoring --------------------------------------------------------------------------------

def continuation_ids(tokenizer: TextTokenizer, context: str, choice: str
                     ) -> tuple[list[int], list[int]]:
    """Context and choice ids, split off a tokenization of the whole text when it starts with
    the context's own ids (so the choice is tokenized as it would be in running text)."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(f"{context} {choice}")
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(f" {choice}")


def choice_sample(ctx: list[int], cont: list[int], layout: VocabLayout,
                  seq_length: int) -> Sample:
    """`[bos] context choice` as one sample whose loss mask covers the choice's tokens (the
    context is cut from the left when the whole does not fit)."""
    if len(cont) + 1 > seq_length:
        raise ValueError(f"a choice of {len(cont)} tokens does not fit seq_length={seq_length}")
    ctx = ctx[max(0, len(ctx) + len(cont) + 1 - (seq_length + 1)):]
    seq = np.asarray([layout.bos_id, *ctx, *cont], dtype=np.int64)
    full = np.full(seq_length + 1, layout.pad_id, dtype=np.int64)
    full[:len(seq)] = seq
    target = np.arange(1, seq_length + 1)
    mask = (target >= len(seq) - len(cont)) & (target < len(seq))
    return {"tokens": torch.from_numpy(full[:-1].copy()),
            "labels": torch.from_numpy(full[1:].copy()),
            "loss_mask": torch.from_numpy(mask.astype(np.float32)),
            "modality": torch.zeros(seq_length, dtype=torch.int64)}


def sequence_loglik(per_token_loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
    """Loss function reporting each sequence's summed log-probability over its mask."""
    masked = per_token_loss.float() * batch["loss_mask"].float()
    count = batch["loss_mask"].sum().to(torch.int)
    return masked.sum(), count, {"loglik": -masked.sum(-1).detach()}


def choice_logliks(chunks: list[torch.nn.Module], samples: list[Sample],
                   micro_batch_size: int, device: torch.device) -> np.ndarray:
    """Summed log-probabilities of the samples' masked tokens, on every rank."""
    reports = forward_reports(chunks, samples, micro_batch_size, sequence_loglik, device)
    values = torch.zeros(len(samples), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        values = torch.cat([r["loglik"].double().cpu() for r in reports])[:len(samples)]
    return broadcast_from_last_stage(values, device).numpy()


def _bucketed_logliks(chunks: list[torch.nn.Module], pairs: list[tuple[list[int], list[int]]],
                      layout: VocabLayout, seq_length: int, micro_batch_size: int,
                      device: torch.device) -> np.ndarray:
    """choice_logliks of `[bos] context choice` for each pair, in the pairs' order.

    The pairs are sorted by length and scored a microbatch at a time, each padded to its own
    longest pair instead of the model's seq_length: causal attention makes trailing padding
    irrelevant to the scores, so short items cost what they are (a sixth of the tokens on the
    mini-study's WordNet task). Every rank forms the same buckets (pipeline stages agree)."""
    lengths = [min(seq_length, len(ctx) + len(cont) + 1) for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    logliks = np.zeros(len(pairs), dtype=np.float64)
    for start in range(0, len(order), micro_batch_size):
        bucket = order[start:start + micro_batch_size]
        length = max(lengths[i] for i in bucket)
        samples = [choice_sample(*pairs[i], layout, length) for i in bucket]
        logliks[bucket] = choice_logliks(chunks, samples, micro_batch_size, device)
    return logliks


def choice_accuracy(chunks: list[torch.nn.Module], items: list[ChoiceItem],
                    tokenizer: TextTokenizer, layout: VocabLayout, seq_length: int,
                    micro_batch_size: int, device: torch.device) -> dict[str, float]:
    """acc and acc_norm over the items."""
    pairs = [continuation_ids(tokenizer, item.context, choice)
             for item in items for choice in item.choices]
    logliks = _bucketed_logliks(chunks, pairs, layout, seq_length, micro_batch_size, device)
    correct, correct_norm = [], []
    start = 0
    for item in items:
        scores = logliks[start:start + len(item.choices)]
        lengths = np.array([max(1, len(c.encode("utf-8"))) for c in item.choices])
        correct.append(int(int(np.argmax(scores)) == item.answer))
        correct_norm.append(int(int(np.argmax(scores / lengths)) == item.answer))
        start += len(item.choices)
    return {"acc": sum(correct) / len(items), "acc_norm": sum(correct_norm) / len(items),
            "num_items": len(items), "correct": correct}  # per item: for intervals


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


# ---- the tool -------------------------------------------------------------------------------

def evaluate_forgetting(checkpoint: str | Path, tp: int = 1, pp: int = 1,
                        text_file: str | Path | None = None,
                        prompts_file: str | Path | None = None,
                        tasks: tuple[str | Path, ...] = (),
                        text_tokenizer: str | Path | None = None, max_new_tokens: int = 32,
                        completions_out: str | Path | None = None,
                        micro_batch_size: int | None = None,
                        per_item: bool = False,
                        text_window: int | None = None) -> dict[str, Any]:
    """The JSON report of tools/eval_forgetting.py (every rank returns it; rank 0 writes the
    completions jsonl). `per_item` adds each held-out window's loss (one more pass);
    `text_window` cuts the held-out text into windows of that many tokens (default: the
    model's seq_length), so models of other sequence lengths see the same windows."""
    from megatron_t2i.eval import loading
    from megatron_t2i.eval.generate import complete_text
    from megatron_t2i.eval.perplexity import modality_perplexity, text_file_samples

    if prompts_file is not None and pp > 1:
        raise ValueError("greedy completions need pipeline_model_parallel_size=1 (any TP): "
                         "run them with --pp 1, or leave out --prompts")
    cfg, chunks, layout, _ = loading.load_for_eval(checkpoint, tp, pp)
    tokenizer = loading.text_tokenizer_for(cfg, text_tokenizer)
    device = next(chunks[0].parameters()).device
    mbs = micro_batch_size or cfg.train.micro_batch_size
    seq = cfg.model.seq_length
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "tp": tp, "pp": pp}
    if text_file is not None:
        samples = text_file_samples(text_file, tokenizer, layout, text_window or seq)
        report["text_perplexity"] = dict(modality_perplexity(chunks, samples, mbs, device),
                                         file=str(text_file))
        if per_item:  # each window's summed loss and token count, for intervals over items
            report["text_perplexity"]["window_loss_sums"] = \
                (-choice_logliks(chunks, samples, mbs, device)).tolist()
            report["text_perplexity"]["window_tokens"] = \
                [int(x["loss_mask"].sum()) for x in samples]
    for task in tasks:
        items = read_choice_task(task)
        report.setdefault("tasks", {})[Path(task).stem] = choice_accuracy(
            chunks, items, tokenizer, layout, seq, mbs, device)
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
        ids = complete_text(chunks[0], layout, [tokenizer.encode(p) for p in prompts],
                            max_new_tokens)
        completions = [{"prompt": p, "completion": tokenizer.decode(c)}
                       for p, c in zip(prompts, ids)]
        report["completions"] = completions
        if completions_out is not None and loading.is_writer():
            Path(completions_out).write_text(
                "".join(json.dumps(c) + "\n" for c in completions), encoding="utf-8")
    return report
