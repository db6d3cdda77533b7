"""The engine seam: engines never reach the trainer, and training and evaluation share one
forward step and one loss reduction (training/forward.py, training/loss.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import world_of_one
from test_layering import import_graph

ENGINES = ("megatron_t2i.training.megatron_engine", "megatron_t2i.training.deepspeed_engine")
TRAINER = "megatron_t2i.training.trainer"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_never_imports_the_trainer(engine):
    graph = import_graph()
    assert engine in graph
    assert TRAINER not in _reachable(graph, engine)


def _report(losses: list[float], mask: list[float], modality: list[int]) -> dict:
    from megatron_t2i.training.loss import modality_loss

    batch = {"loss_mask": torch.tensor([mask]), "modality": torch.tensor([modality])}
    return modality_loss(torch.tensor([losses]), batch)[2]


def test_last_stage_reduction_gives_token_means_and_counts():
    from megatron_t2i.training.loss import REPORT_KEYS, present_losses, reduce_on_last_stage

    # two microbatches: text targets 1.0 and 3.0, image targets 2.0 (the masked 9.0 never counts)
    reports = [_report([1.0, 2.0, 9.0], [1, 1, 0], [0, 1, 1]),
               _report([3.0, 2.0, 2.0], [1, 1, 1], [0, 1, 1])]
    with world_of_one():
        out = reduce_on_last_stage(reports, "cpu")
        text_only = reduce_on_last_stage([_report([4.0, 5.0], [1, 1], [0, 0])], "cpu")
    assert list(out) == [*REPORT_KEYS, *(f"{k}_tokens" for k in REPORT_KEYS)]
    assert out["loss"] == pytest.approx(10.0 / 5)
    assert (out["loss_text"], out["loss_image"]) == (pytest.approx(2.0), pytest.approx(2.0))
    assert (out["loss_tokens"], out["loss_text_tokens"], out["loss_image_tokens"]) == (5, 2, 3)
    # a batch without image targets has no image loss: NaN here, absent from the logs
    assert math.isnan(text_only["loss_image"]) and text_only["loss_image_tokens"] == 0
    assert "loss_image" not in present_losses(text_only)
