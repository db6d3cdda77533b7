"""An exponential moving average of the weights (`train.ema_decay`), as LlamaGen and most
image generators sample from.

    ema = EMA(chunks, decay=0.999)       # after the model is built (and resumed)
    ema.update(chunks)                   # after every optimizer step that was taken
    with ema.applied(chunks): ...        # sample / evaluate with the averaged weights

Each rank keeps an fp32 copy of its own parameters only, so the average is sharded exactly
like the model (its TP / PP slice; data-parallel replicas hold equal copies). In a checkpoint
it sits under `ema.<the model's key>` with the model's shard layout, so dist_checkpointing
reshards it to another TP / PP on load like the weights; resuming restores it bit for bit.
Updates read the model's parameters after the optimizer step (under bf16 the bf16 model
weights, not the optimizer's fp32 main copy): with the distributed optimizer
they are the gathered, updated values (parallel.overlap_param_gather would defer that gather
to the next forward pass, so config validation refuses the combination).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

KEY = "ema"


class EMA:
    def __init__(self, chunks: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = [[p.detach().float().clone() for p in c.parameters()] for c in chunks]

    @torch.no_grad()
    def update(self, chunks: list[torch.nn.Module]) -> None:
        """shadow = decay * shadow + (1 - decay) * parameter, in fp32."""
        for shadow, chunk in zip(self.shadow, chunks):
            for s, p in zip(shadow, chunk.parameters()):
                s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, chunks: list[torch.nn.Module]) -> Iterator[None]:
        """The averaged weights in the model for the duration; the trained ones after."""
        saved = [[p.detach().clone() for p in c.parameters()] for c in chunks]
        self._copy_into(chunks, self.shadow)
        try:
            yield
        finally:
            self._copy_into(chunks, saved)

    @staticmethod
    @torch.no_grad()
    def _copy_into(chunks: list[torch.nn.Module], values: list[list[torch.Tensor]]) -> None:
        for chunk, tensors in zip(chunks, values):
            for p, v in zip(chunk.parameters(), tensors):
                p.copy_(v)

    def sharded_state_dict(self, chunks: list[torch.nn.Module]) -> dict[str, Any]:
        """The average as the model's own sharded state dict (same shards, same factories,
        e.g. SwiGLU's split fc1) with the fp32 copies as data, keys prefixed `ema.`."""
        out: dict[str, Any] = {}
        for i, (chunk, shadow) in enumerate(zip(chunks, self.shadow)):
            # the model's entries hold the parameter objects themselves: swap in the copies
            copies = {id(p): s for p, s in zip(chunk.parameters(), shadow)}
            for name, v in chunk.sharded_state_dict().items():
                if not isinstance(v, (ShardedTensor, ShardedTensorFactory)):
                    continue  # _extra_state objects: nothing to average
                if id(v.data) not in copies:
                    raise RuntimeError(f"EMA: the sharded entry {v.key} is not a parameter")
                data = copies[id(v.data)]
                extra = {"dtype": data.dtype} if isinstance(v, ShardedTensor) else {}
                out[f"chunk{i}.{name}"] = dataclasses.replace(v, key=f"{KEY}.{v.key}",
                                                              data=data, **extra)
        return out

    @torch.no_grad()
    def load(self, chunks: list[torch.nn.Module], loaded: dict[str, Any]) -> None:
        """Copy what dist_checkpointing loaded for `sharded_state_dict`'s entries."""
        for name, entry in self.sharded_state_dict(chunks).items():
            if name not in loaded:
                raise RuntimeError(f"EMA: the checkpoint has no average of {entry.key}")
            entry.data.copy_(loaded[name])


def load_averaged_weights(folder: str | Path, chunks: list[torch.nn.Module]) -> None:
    """Put a checkpoint's EMA weights (meta `has_ema`) into the model, resharded to this
    rank's TP / PP like the weights: what evaluation and sampling tools use when present."""
    averaged = EMA(chunks, decay=0.5)  # the decay plays no part in loading
    sharded = {KEY: averaged.sharded_state_dict(chunks)}
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(folder))
    averaged.load(chunks, loaded[KEY])
    averaged._copy_into(chunks, averaged.shadow)
