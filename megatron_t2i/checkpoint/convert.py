"""Between a pretrained LM's tensors and a trainer checkpoint (the megatron-core GPT layout).

Every source format (hf.py, openlm.py) answers `get(name, layer)` for the same per-layer
names, each a plain [out, in] matrix or a vector:

    embed, final_norm, final_norm_bias, lm_head
    attn_norm, attn_norm_bias, q, k, v, o, mlp_norm, mlp_norm_bias, gate, up, down

and this module packs them into the trainer's global keys (layers stacked on a leading axis):

    linear_qkv.weight   per query group g: [q heads of g; k_g; v_g]   (megatron's order)
    linear_fc1.weight   [gate; up]                                   (SwiGLU)
    *.layer_norm_weight the pre-attention / pre-MLP norms (fused into the next linear's key)

RoPE is rotate-half (non-interleaved) on both sides: megatron-core's default, HF Llama's and
OpenLM's `rotary`. No bias vectors (add_bias_linear false); LayerNorm sources without a bias
get a zero bias.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_t2i.checkpoint.io import (
    TensorSpec,
    WriteStats,
    object_bytes,
    write_checkpoint,
)
from megatron_t2i.checkpoint.layout import CheckpointError, staged_output, write_latest
from megatron_t2i.config import Config
from megatron_t2i.vocab import VocabLayout

L = "decoder.layers."
QKV, PROJ = L + "self_attention.linear_qkv.", L + "self_attention.linear_proj."
FC1, FC2 = L + "mlp.linear_fc1.", L + "mlp.linear_fc2."
EMBED, OUTPUT, FINAL = "embedding.word_embeddings.weight", "output_layer.weight", \
    "decoder.final_layernorm."
EXTRA_STATE_MODULES = (PROJ, QKV, FC1, FC2)


@dataclass(frozen=True)
class ModelSpec:
    """The architecture, in our ModelConfig's words."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int  # rows of the source's embedding table
    normalization: str  # RMSNorm | LayerNorm
    norm_epsilon: float
    rotary_base: int
    tied: bool
    max_position_embeddings: int
    bos_id: int
    eod_id: int
    pad_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_parallel(self, tp: int, pp: int, where: str) -> None:
        for what, n in (("num_attention_heads", self.num_attention_heads),
                        ("num_query_groups", self.num_query_groups),
                        ("ffn_hidden_size", self.ffn_hidden_size)):
            if n % tp:
                raise CheckpointError(f"{where}: {what}={n} is not divisible by "
                                          f"tensor_model_parallel_size={tp}")
        if self.num_layers % pp:
            raise CheckpointError(f"{where}: num_layers={self.num_layers} is not divisible "
                                      f"by pipeline_model_parallel_size={pp}")


class Source(Protocol):
    path: Path
    spec: ModelSpec
    format: str

    def get(self, name: str, layer: int | None = None) -> torch.Tensor | None: ...


def source_shapes(spec: ModelSpec) -> dict[tuple[str, int | None], tuple[int, ...]]:
    """The shape of every source tensor (`Source.get`'s names) the architecture implies."""
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    out: dict[tuple[str, int | None], tuple[int, ...]] = {
        ("embed", None): (spec.vocab_size, h), ("final_norm", None): (h,),
        ("lm_head", None): (spec.vocab_size, h)}
    per_layer = {"attn_norm": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
                 "mlp_norm": (h,), "gate": (f, h), "up": (f, h), "down": (h, f)}
    for layer in range(spec.num_layers):
        out.update({(name, layer): shape for name, shape in per_layer.items()})
    return out


def check_special_ids(spec: ModelSpec, where: str) -> None:
    """bos, eos and pad inside the source's vocabulary: a pad id past it would, after
    surgery, be an image code."""
    for name, value in (("bos", spec.bos_id), ("eos", spec.eod_id), ("pad", spec.pad_id)):
        if value is not None and not 0 <= value < spec.vocab_size:
            raise CheckpointError(f"{where}: the {name} id {value} is outside the "
                                      f"vocabulary [0, {spec.vocab_size})")


def check_source_shapes(src: Source) -> None:
    """Every tensor the import will read has the shape the architecture implies: refused in
    one line naming the tensor before anything is written (a wrong shape would otherwise fail
    deep inside a reshape, or, for the vocabulary tables, import silently)."""
    bias_shape = (src.spec.hidden_size,)
    for (name, layer), shape in source_shapes(src.spec).items():
        # a header-only shape where the source has one (safetensors), else the tensor's
        got = src.shape(name, layer) if hasattr(src, "shape") else tuple(src.get(name,
                                                                                 layer).shape)
        where = name if layer is None else f"{name} of layer {layer}"
        if tuple(got) != shape:
            raise CheckpointError(f"{src.path}: {where} is {list(got)}, the "
                                      f"architecture implies {list(shape)}")
        bias = src.get(name + "_bias", layer) if name.endswith("norm") else None
        if bias is not None and tuple(bias.shape) != bias_shape:
            raise CheckpointError(f"{src.path}: {where} bias is {list(bias.shape)}, the "
                                      f"architecture implies {list(bias_shape)}")


# ---- packing ---------------------------------------------------------------------------------

def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    g, d, h = spec.num_query_groups, spec.head_dim, spec.hidden_size
    per_group = spec.num_attention_heads // g
    q = q.reshape(g, per_group * d, h)
    k, v = k.reshape(g, d, h), v.reshape(g, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def unpack_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    g, d, h = spec.num_query_groups, spec.head_dim, spec.hidden_size
    per_group = spec.num_attention_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, h)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def trainer_entries(spec: ModelSpec, padded: int, dtype: torch.dtype) -> dict[str, Any]:
    """Every key a trainer checkpoint of this architecture holds, with its global shape."""
    n, h, f = spec.num_layers, spec.hidden_size, spec.ffn_hidden_size
    d, heads, g = spec.head_dim, spec.num_attention_heads, spec.num_query_groups
    shapes = {
        EMBED: (padded, h),
        QKV + "layer_norm_weight": (n, h),
        QKV + "weight": (n, (heads + 2 * g) * d, h),
        PROJ + "weight": (n, h, heads * d),
        FC1 + "layer_norm_weight": (n, h),
        FC1 + "weight": (n, 2 * f, h),
        FC2 + "weight": (n, h, f),
        FINAL + "weight": (h,),
    }
    if spec.normalization == "LayerNorm":
        shapes.update({QKV + "layer_norm_bias": (n, h), FC1 + "layer_norm_bias": (n, h),
                       FINAL + "bias": (h,)})
    if not spec.tied:
        shapes[OUTPUT] = (padded, h)
    entries: dict[str, Any] = {k: TensorSpec(s, dtype) for k, s in shapes.items()}
    none = object_bytes(None)  # the local spec's linear layers carry no extra state
    for module in EXTRA_STATE_MODULES:
        for layer in range(n):
            entries[f"{module}_extra_state/shard_{layer}_{n}"] = none
    return entries


def trainer_tensor(key: str, src: Source, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """One trainer tensor built from the source (layers stacked)."""
    spec = src.spec
    per_layer = {
        QKV + "layer_norm_weight": lambda i: src.get("attn_norm", i),
        QKV + "layer_norm_bias": lambda i: _bias(src.get("attn_norm_bias", i), spec),
        QKV + "weight": lambda i: pack_qkv(src.get("q", i), src.get("k", i), src.get("v", i),
                                           spec),
        PROJ + "weight": lambda i: src.get("o", i),
        FC1 + "layer_norm_weight": lambda i: src.get("mlp_norm", i),
        FC1 + "layer_norm_bias": lambda i: _bias(src.get("mlp_norm_bias", i), spec),
        FC1 + "weight": lambda i: torch.cat([src.get("gate", i), src.get("up", i)]),
        FC2 + "weight": lambda i: src.get("down", i),
    }
    if key in per_layer:
        return torch.stack([per_layer[key](i).to(dtype) for i in range(spec.num_layers)])
    if key in (EMBED, OUTPUT):
        rows = src.get("embed" if key == EMBED else "lm_head")
        table = torch.zeros(padded, spec.hidden_size, dtype=dtype)
        table[:rows.shape[0]] = rows.to(dtype)
        return table
    if key == FINAL + "weight":
        return src.get("final_norm").to(dtype)
    if key == FINAL + "bias":
        return _bias(src.get("final_norm_bias"), spec).to(dtype)
    raise KeyError(key)


def _bias(t: torch.Tensor | None, spec: ModelSpec) -> torch.Tensor:
    return torch.zeros(spec.hidden_size) if t is None else t


# ---- import ----------------------------------------------------------------------------------

def text_layout(spec: ModelSpec) -> VocabLayout:
    """The vocabulary of a text LM: its ids only (plus <pad> if it has no pad id)."""
    return VocabLayout(text_size=spec.vocab_size, image_size=0, bos_id=spec.bos_id,
                       eod_id=spec.eod_id, added_specials=(), text_pad_id=spec.pad_id)


def trainer_config(spec: ModelSpec, tp: int, pp: int, divisible_by: int) -> Config:
    cfg = Config()
    m = cfg.model
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "normalization", "norm_epsilon", "rotary_base",
                 "max_position_embeddings"):
        setattr(m, name, getattr(spec, name))
    m.untie_embeddings_and_output_weights = not spec.tied
    m.activation, m.position_embedding_type, m.add_bias_linear = "swiglu", "rope", False
    m.make_vocab_size_divisible_by = divisible_by
    m.seq_length = min(m.seq_length, spec.max_position_embeddings)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.data.text_vocab_size, cfg.data.image_vocab_size = spec.vocab_size, 0
    return cfg


def import_checkpoint(src: Source, output: str | Path, tensor_parallel: int = 1,
                      pipeline_parallel: int = 1, divisible_by: int = 128,
                      dtype: torch.dtype = torch.float32, overwrite: bool = False
                      ) -> WriteStats:
    """Write `output` (a checkpoint root, iteration 0) from a pretrained LM."""
    spec = src.spec
    spec.check_parallel(tensor_parallel, pipeline_parallel, str(src.path))
    check_special_ids(spec, str(src.path))
    check_source_shapes(src)
    layout = text_layout(spec)
    padded = layout.padded_size(divisible_by, tensor_parallel)
    cfg = trainer_config(spec, tensor_parallel, pipeline_parallel, divisible_by)
    from megatron_t2i.training.checkpointing import OPTIM_METADATA

    meta = {"config": cfg.to_dict(), "vocab": layout.to_dict(), "padded_vocab_size": padded,
            "iteration": 0, "consumed_samples": 0,
            # no per-rank state (RNG, optimizer) was saved under any parallel layout
            "parallel": {}, "has_optimizer": False,
            "imported_from": {"format": src.format, "path": str(src.path),
                              "spec": dataclasses.asdict(spec),
                              # export restores the source's own special ids from it
                              "special_ids": source_special_ids(src)}}
    common = {"iteration": 0, "consumed_samples": 0, "content_metadata": dict(OPTIM_METADATA)}
    entries = trainer_entries(spec, padded, dtype)
    with staged_output(output, overwrite, sources=(src.path,)) as tmp:
        stats = write_checkpoint(tmp / "iter_0000000", entries,
                                 lambda key: trainer_tensor(key, src, padded, dtype), common,
                                 meta, desc=f"import {src.format}")
        write_latest(tmp, 0)
    stats.extra.update(padded_vocab_size=padded, layout=layout)
    return stats


def source_special_ids(src: Source) -> dict[str, Any]:
    """The special ids as the source spelled them (a list of eos ids, a null pad)."""
    config = getattr(src, "config", None)
    if isinstance(config, dict):
        return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    spec = src.spec
    return {"bos_token_id": spec.bos_id, "eos_token_id": spec.eod_id,
            "pad_token_id": spec.pad_id}


def spec_from_meta(meta: dict[str, Any]) -> ModelSpec:
    """The architecture a trainer checkpoint's meta.json describes."""
    m = meta["config"]["model"]
    layout = VocabLayout.from_dict(meta["vocab"])
    from megatron_t2i.config import ModelConfig

    mc = ModelConfig(**{k: v for k, v in m.items()
                        if k in {f.name for f in dataclasses.fields(ModelConfig)}})
    return ModelSpec(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"],
        num_query_groups=m.get("num_query_groups") or m["num_attention_heads"],
        ffn_hidden_size=mc.resolved_ffn_hidden_size, vocab_size=layout.size,
        normalization=m["normalization"], norm_epsilon=m["norm_epsilon"],
        rotary_base=m["rotary_base"], tied=not m["untie_embeddings_and_output_weights"],
        max_position_embeddings=m.get("max_position_embeddings") or m["seq_length"],
        bos_id=layout.bos_id, eod_id=layout.eod_id, pad_id=layout.pad_id)
