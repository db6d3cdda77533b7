"""Checkpoint key names, read from megatron-core's own sharded state dict.

A trainer checkpoint is keyed by what `GPTModel.sharded_state_dict()` returns: global names
with the layers stacked on a leading axis (`decoder.layers.mlp.linear_fc1.weight` is
[layers, 2 x ffn, hidden]), the local spec's norms renamed into the following linear layer's
key, and one sharded object per layer for each linear layer's `_extra_state`. Nothing here
spells those names out: `model_keys` builds the model on the meta device (no memory, no
initialisation), takes its sharded state dict and names each tensor by the parameter it
holds (the word-embedding table is the weight of `model.embedding.word_embeddings`, whatever
megatron-core calls its key). The checkpoint tools (import, export, surgery, alignment) and
the freeze plan all take their names from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
)
from megatron.core.models.gpt import GPTModel

from megatron_t2i.config import Config, ModelConfig

# Roles of the per-layer parameters: attribute paths inside one TransformerLayer.
_LAYER_ROLES = {
    "qkv": ("self_attention", "linear_qkv", "weight"),
    "proj": ("self_attention", "linear_proj", "weight"),
    "fc1": ("mlp", "linear_fc1", "weight"),
    "fc2": ("mlp", "linear_fc2", "weight"),
    "attn_norm": ("input_layernorm", "weight"),
    "attn_norm_bias": ("input_layernorm", "bias"),
    "mlp_norm": ("pre_mlp_layernorm", "weight"),
    "mlp_norm_bias": ("pre_mlp_layernorm", "bias"),
}
_MODEL_ROLES = {
    "word_embeddings": ("embedding", "word_embeddings", "weight"),
    "output_layer": ("output_layer", "weight"),
    "final_norm": ("decoder", "final_layernorm", "weight"),
    "final_norm_bias": ("decoder", "final_layernorm", "bias"),
}


@dataclass(frozen=True)
class ModelKeys:
    """The keys of a trainer checkpoint of one architecture (the model part).

    `roles` maps a role (word_embeddings, output_layer, final_norm, final_norm_bias, and per
    layer qkv, proj, fc1, fc2, attn_norm, attn_norm_bias, mlp_norm, mlp_norm_bias) to its key;
    a role the architecture lacks (a bias of RMSNorm, the output layer of a tied model) is
    absent. `shapes`: every tensor key with its global shape, in megatron-core's order.
    `stacked`: the keys whose tensors stack every layer on a leading axis. `objects`: every
    sharded object's storage key (the linear layers' `_extra_state`)."""

    roles: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    stacked: frozenset[str]
    objects: tuple[str, ...]

    def key(self, role: str) -> str:
        return self.roles[role]

    def get(self, role: str) -> str | None:
        return self.roles.get(role)


def model_keys(model: ModelConfig, padded_vocab_size: int = 128) -> ModelKeys:
    """The checkpoint keys of `model` (shapes at `padded_vocab_size` rows), from megatron-core's
    sharded state dict of the model built on the meta device. Cached per architecture."""
    return _model_keys(json.dumps(dataclasses.asdict(model), sort_keys=True),
                       padded_vocab_size)


def vocab_table_keys() -> tuple[str, str]:
    """The keys of the word-embedding table and the (untied) output layer: the same for every
    architecture, so read off a tiny one."""
    keys = model_keys(ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                  ffn_hidden_size=8, untie_embeddings_and_output_weights=True))
    return keys.key("word_embeddings"), keys.key("output_layer")


def vocab_parameters(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This chunk's vocabulary tables by role (those it holds: a middle pipeline stage has
    none; a tied last stage holds a copy of the word embeddings as its output layer)."""
    model = _unwrap(chunk)
    out = {}
    for role in ("word_embeddings", "output_layer"):
        param = _attr(model, _MODEL_ROLES[role])
        if isinstance(param, torch.nn.Parameter):
            out[role] = param
    return out


@functools.lru_cache(maxsize=16)
def _model_keys(model_json: str, padded_vocab_size: int) -> ModelKeys:
    cfg = Config()
    cfg.model = ModelConfig(**json.loads(model_json))
    cfg.model.transformer_impl = "local"  # the CPU tools' spec, and the trainer's without TE
    cfg.train.precision = "fp32"
    with _world_of_one():
        model = _meta_model(cfg, padded_vocab_size)
        sharded = model.sharded_state_dict(prefix="")
    by_param = {id(v.data): v.key for v in nested_values(sharded)
                if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    roles = {}
    layer = model.decoder.layers[0]
    for owner, table in ((model, _MODEL_ROLES), (layer, _LAYER_ROLES)):
        for role, path in table.items():
            param = _attr(owner, path)
            if param is not None and id(param) in by_param:
                roles[role] = by_param[id(param)]
    apply_factories(sharded)  # the SwiGLU fc1 factory: its pieces carry the global shape
    shapes, stacked, objects = {}, set(), {}
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensor):
            shapes.setdefault(v.key, tuple(v.global_shape))
            if v.prepend_axis_num:  # megatron-core's mark of a layer axis
                stacked.add(v.key)
        elif isinstance(v, ShardedObject):  # one per layer: `<key>/shard_<layer>_<layers>`
            objects.setdefault(v.unique_key, None)
    return ModelKeys(roles, shapes, frozenset(stacked), tuple(objects))


def _meta_model(cfg: Config, padded_vocab_size: int) -> GPTModel:
    """The whole model (every layer, embedding and output layer) on the meta device."""
    from megatron_t2i.model.gpt import layer_spec, transformer_config

    tcfg = transformer_config(cfg, on_cuda=False)
    tcfg.perform_initialization = False
    with torch.device("meta"):
        return GPTModel(config=tcfg, transformer_layer_spec=layer_spec(cfg),
                        vocab_size=padded_vocab_size,
                        max_sequence_length=cfg.model.max_position_embeddings
                        or cfg.model.seq_length,
                        pre_process=True, post_process=True, parallel_output=True,
                        share_embeddings_and_output_weights=not
                        cfg.model.untie_embeddings_and_output_weights,
                        position_embedding_type=cfg.model.position_embedding_type,
                        rotary_base=cfg.model.rotary_base)


@contextlib.contextmanager
def _world_of_one() -> Iterator[None]:
    """megatron-core's layers ask parallel_state for ranks and sizes: a gloo world of one in
    this process while the model is built, torn down after. Keys are global names, so this
    needs no real process group (and is never used inside a running job's groups)."""
    if parallel_state.model_parallel_is_initialized():  # a job's own groups: keys are global
        yield
        return
    started = not dist.is_initialized()
    if not started and dist.get_world_size() > 1:  # creating groups is collective
        raise RuntimeError("model_keys: torch.distributed runs with several ranks but "
                           "megatron-core's groups are not initialised; call it after them")
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


def _attr(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
