"""Freezing parts of the model: the paper's "keep the language brain" ablations.

    plan = apply_freeze(chunks, cfg.model.freeze, layout, padded_vocab_size)   # before DDP
    optimizer = get_megatron_optimizer(ocfg, ddp_chunks,
                                       config_overrides=plan.optimizer_overrides(ocfg))
    ...backward...; plan.zero_frozen_row_grads(); optimizer.step()

`model.freeze` names parameter groups (`config.FREEZE_GROUPS`, checked by config validation):

    embeddings    word (and learned position) embeddings
    output_layer  the output projection (with tied embeddings: the same tensor as the word
                  embeddings, so the two must be frozen together)
    attention     every layer's self-attention (QKV and output projections)
    mlp           every layer's MLP (fc1, fc2)
    norms         every norm (the layers' input / pre-MLP norms, the final norm; with
                  Transformer Engine also the norms fused into linear_qkv / linear_fc1)
    transformer   all decoder layers with their norms and the final norm: only the
                  embeddings and the output layer train
    text_rows     the text-vocabulary rows [0, text_size) of the word embeddings and the
                  output layer stay fixed; the image-code, special and padding rows train

Whole groups get requires_grad=False before megatron-core's DDP and optimizer exist: both skip
such parameters, so a frozen parameter has no gradient buffer, no optimizer state and no
weight decay, and it does not count in the gradient norm.

Rows cannot be frozen that way (a parameter trains or not), so for `text_rows` the text rows of
the gradient (`param.main_grad`, the DDP buffer, after the data-parallel reduction) are zeroed
before every optimizer step. With Adam a row whose gradient is always zero keeps zero moments
and gets a zero update; only decoupled weight decay would still move it, so the word-embedding
and output-layer weights get weight decay 0 (a per-parameter override). The new image rows
therefore train without weight decay too. With tensor parallelism each rank holds a
contiguous slice of the vocabulary, so each rank zeroes the text rows inside its own slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_t2i.config import ConfigError
from megatron_t2i.model.keys import vocab_parameters
from megatron_t2i.vocab import VocabLayout

_PARAMETER_GROUPS = ("embeddings", "output_layer", "attention", "mlp", "norms")


class FreezeError(ConfigError):
    """A freeze request that cannot be honoured; the message names the key and the group."""


def parameter_group(name: str) -> str:
    """The group a parameter belongs to, from its name in a GPTModel chunk ('module.'
    prefixes of the bf16 and DDP wrappers are ignored). 'norms' wins over 'attention' and
    'mlp' for the norms Transformer Engine fuses into the first linear of each block."""
    while name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("embedding."):
        return "embeddings"
    if name.startswith("output_layer."):
        return "output_layer"
    if name.startswith("decoder."):
        if "norm" in name:
            return "norms"
        if ".self_attention." in name:
            return "attention"
        if ".mlp." in name:
            return "mlp"
    raise FreezeError(f"parameter {name!r} belongs to no freeze group; "
                      f"megatron_t2i/model/freeze.py needs to learn its name")


def is_frozen(name: str, freeze: Iterable[str]) -> bool:
    """Whether a whole parameter is frozen by the `freeze` groups ('text_rows' freezes rows
    only, never a whole parameter)."""
    freeze = set(freeze)
    bare = name.replace("module.", "")
    return parameter_group(name) in freeze or ("transformer" in freeze
                                               and bare.startswith("decoder."))


@dataclasses.dataclass
class FrozenRows:
    """Rows [start, stop) of this rank's shard of one vocabulary-sized parameter."""

    name: str
    param: torch.nn.Parameter
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * self.param.shape[1]


@dataclasses.dataclass
class FreezePlan:
    groups: tuple[str, ...]
    rows: list[FrozenRows]
    # this rank's vocabulary tables by parameter name (model/keys.py finds them)
    table_names: tuple[str, ...] = ()

    def optimizer_overrides(self, optimizer_config) -> dict | None:
        """megatron-core `config_overrides` for get_megatron_optimizer: None (its defaults)
        unless rows are frozen; then its defaults plus weight decay 0 on the word-embedding
        and output-layer weights, so the frozen rows get no decoupled decay."""
        if not self.rows and "text_rows" not in self.groups:
            return None
        from megatron.core.optimizer import ParamKey, get_standard_config_overrides
        from megatron.core.optimizer_param_scheduler import ParamGroupOverride

        overrides = get_standard_config_overrides(optimizer_config)
        key = ParamKey(name=tuple(f"*{name}" for name in self.table_names))
        overrides[key] = ParamGroupOverride(wd_mult=0.0)
        return overrides

    @torch.no_grad()
    def zero_frozen_row_grads(self) -> None:
        """Zero the frozen rows of the reduced gradients; call between backward and step."""
        for r in self.rows:
            grad = getattr(r.param, "main_grad", None)
            if grad is None:
                grad = r.param.grad
            if grad is not None:
                grad[r.start:r.stop].zero_()


def apply_freeze(chunks: Sequence[torch.nn.Module], freeze: Sequence[str],
                 layout: VocabLayout, padded_vocab_size: int) -> FreezePlan:
    """Set requires_grad=False on the frozen groups of this rank's chunks (before DDP and the
    optimizer are built) and find this rank's frozen vocabulary rows."""
    rows: list[FrozenRows] = []
    tables: list[str] = []
    for chunk in chunks:
        vocab = vocab_parameters(chunk).values()
        for name, param in chunk.named_parameters():
            is_table = any(param is t for t in vocab)
            if is_table:
                tables.append(name.replace("module.", ""))
            if is_frozen(name, freeze):
                param.requires_grad_(False)
            elif "text_rows" in freeze and is_table:
                rows.append(_text_rows(name, param, layout.text_size, padded_vocab_size))
    _check_something_trains(chunks, freeze)
    return FreezePlan(tuple(freeze), [r for r in rows if r.stop > r.start], tuple(tables))


def _text_rows(name: str, param: torch.nn.Parameter, text_size: int,
               padded_vocab_size: int) -> FrozenRows:
    """Vocabulary-parallel tables are split in contiguous row blocks over TP ranks (megatron's
    VocabParallelEmbedding and the column-parallel output layer alike)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local = param.shape[0]
    if local * tp != padded_vocab_size:
        raise FreezeError(f"{name}: {local} rows x TP {tp} != padded vocabulary "
                          f"{padded_vocab_size}; cannot locate the text rows")
    first = parallel_state.get_tensor_model_parallel_rank() * local
    start, stop = min(max(0, -first), local), min(max(0, text_size - first), local)
    return FrozenRows(name, param, start, stop)


def _check_something_trains(chunks: Sequence[torch.nn.Module], freeze: Sequence[str]) -> None:
    """A model with nothing trainable on any rank has no backward pass: refuse on every rank
    (the flag is reduced over the world, so no rank waits for the others). A pipeline stage
    with nothing trainable is fine: megatron-core skips its backward when its output needs
    no gradient, and its DDP and optimizer then hold nothing."""
    trains = any(p.requires_grad for c in chunks for p in c.parameters())
    flag = torch.tensor([1 if trains else 0], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        raise FreezeError(f"model.freeze={list(freeze)} leaves no trainable parameter")


def count_parameters(chunks: Sequence[torch.nn.Module], plan: FreezePlan,
                     group: dist.ProcessGroup | None = None,
                     device: torch.device | str = "cpu") -> dict:
    """Parameter elements that train and that are frozen (frozen text rows count as frozen),
    in all and per group, summed over `group` (the model-parallel group). Each element of the
    model counts once whatever the TP / PP layout: parameters replicated over tensor-parallel
    ranks (norms) count on TP rank 0 only, and a tied output layer's copy of the word
    embeddings on the last pipeline stage not at all."""
    names = ("total", "trainable", "frozen") + tuple(
        f"{g}_{kind}" for g in _PARAMETER_GROUPS for kind in ("trainable", "frozen"))
    counts = dict.fromkeys(names, 0)
    row_elements = {id(r.param): r.numel for r in plan.rows}
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if _counted_elsewhere(name, param, tp_rank):
                continue
            frozen = param.numel() if not param.requires_grad else row_elements.get(id(param), 0)
            g = parameter_group(name)
            for key, n in (("total", param.numel()), ("frozen", frozen),
                           ("trainable", param.numel() - frozen), (f"{g}_frozen", frozen),
                           (f"{g}_trainable", param.numel() - frozen)):
                counts[key] += n
    values = torch.tensor([counts[k] for k in names], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values, group=group)
    counts = dict(zip(names, values.tolist()))
    return {"freeze": list(plan.groups),
            **{k: counts[k] for k in ("total", "trainable", "frozen")},
            "groups": {g: {"trainable": counts[f"{g}_trainable"],
                           "frozen": counts[f"{g}_frozen"]} for g in _PARAMETER_GROUPS}}


def _counted_elsewhere(name: str, param: torch.nn.Parameter, tp_rank: int) -> bool:
    if tp_rank > 0 and not getattr(param, "tensor_model_parallel", False):
        return True
    return parameter_group(name) == "output_layer" and getattr(param, "shared_embedding", False)
