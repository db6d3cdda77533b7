"""Between a pretrained LM's tensors and a trainer checkpoint (the megatron-core GPT layout).

Every source format (hf.py, openlm.py) answers `get(name, layer)` for the same per-layer
names, each a plain [out, in] matrix or a vector:

    embed, final_norm, final_norm_bias, lm_head
    attn_norm, attn_norm_bias, q, k, v, o, mlp_norm, mlp_norm_bias, gate, up, down

and this module packs them into the trainer's tensors (layers stacked on a leading axis), by
role; megatron-core's key of each role comes from model/keys.py:

    qkv                 per query group g: [q heads of g; k_g; v_g]   (megatron's order)
    fc1                 [gate; up]                                   (SwiGLU)
    attn_norm, mlp_norm the pre-attention / pre-MLP norms (stored under the next linear's key)

The architecture is the project's ModelConfig; the source's ids are a text-only VocabLayout.

RoPE is rotate-half (non-interleaved) on both sides: megatron-core's default, HF Llama's and
OpenLM's `rotary`. No bias vectors (add_bias_linear false); LayerNorm sources without a bias
get a zero bias.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_t2i.checkpoint.io import (
    TensorSpec,
    WriteStats,
    layer_chunks,
    object_bytes,
    write_checkpoint,
)
from megatron_t2i.checkpoint.layout import CheckpointError, staged_output, write_latest
from megatron_t2i.config import Config, ModelConfig
from megatron_t2i.model.keys import ModelKeys, model_keys
from megatron_t2i.vocab import VocabLayout


def llama_model(*, num_layers: int, hidden_size: int, num_attention_heads: int,
                num_query_groups: int, ffn_hidden_size: int, normalization: str,
                norm_epsilon: float, rotary_base: int, tied: bool,
                max_position_embeddings: int) -> ModelConfig:
    """The ModelConfig of a source LM: a Llama (SwiGLU, RoPE, no linear biases) of these
    sizes; `seq_length` at most the positions it was trained for."""
    return ModelConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, ffn_hidden_size=ffn_hidden_size,
        normalization=normalization, norm_epsilon=norm_epsilon, rotary_base=rotary_base,
        untie_embeddings_and_output_weights=not tied,
        max_position_embeddings=max_position_embeddings,
        seq_length=min(ModelConfig.seq_length, max_position_embeddings),
        activation="swiglu", position_embedding_type="rope", add_bias_linear=False)


def head_dim(m: ModelConfig) -> int:
    return m.hidden_size // m.num_attention_heads


def query_groups(m: ModelConfig) -> int:
    return m.num_query_groups or m.num_attention_heads


def is_tied(m: ModelConfig) -> bool:
    return not m.untie_embeddings_and_output_weights


def check_parallel(m: ModelConfig, tp: int, pp: int, where: str) -> None:
    for what, n in (("num_attention_heads", m.num_attention_heads),
                    ("num_query_groups", query_groups(m)),
                    ("ffn_hidden_size", m.resolved_ffn_hidden_size)):
        if n % tp:
            raise CheckpointError(f"{where}: {what}={n} is not divisible by "
                                      f"tensor_model_parallel_size={tp}")
    if m.num_layers % pp:
        raise CheckpointError(f"{where}: num_layers={m.num_layers} is not divisible "
                                  f"by pipeline_model_parallel_size={pp}")


class Source(Protocol):
    """A pretrained LM: its architecture, its vocabulary (text ids and specials), and its
    tensors by the names in the module doc."""

    path: Path
    model: ModelConfig
    vocab: VocabLayout
    format: str

    def get(self, name: str, layer: int | None = None) -> torch.Tensor | None: ...


def text_vocab(size: int, bos_id: int, eod_id: int, pad_id: int | None,
               where: str) -> VocabLayout:
    """The vocabulary of a text LM: its ids only (plus <pad> if it has no pad id)."""
    try:
        return VocabLayout(text_size=size, image_size=0, bos_id=bos_id, eod_id=eod_id,
                           added_specials=(), text_pad_id=pad_id)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def source_shapes(m: ModelConfig, vocab_size: int
                  ) -> dict[tuple[str, int | None], tuple[int, ...]]:
    """The shape of every source tensor (`Source.get`'s names) the architecture implies."""
    h, f, d = m.hidden_size, m.resolved_ffn_hidden_size, head_dim(m)
    q, kv = m.num_attention_heads * d, query_groups(m) * d
    out: dict[tuple[str, int | None], tuple[int, ...]] = {
        ("embed", None): (vocab_size, h), ("final_norm", None): (h,),
        ("lm_head", None): (vocab_size, h)}
    per_layer = {"attn_norm": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
                 "mlp_norm": (h,), "gate": (f, h), "up": (f, h), "down": (h, f)}
    for layer in range(m.num_layers):
        out.update({(name, layer): shape for name, shape in per_layer.items()})
    return out


def check_special_ids(vocab: VocabLayout, where: str) -> None:
    """bos, eos and pad inside the source's vocabulary: a pad id past it would, after
    surgery, be an image code."""
    for name, value in (("bos", vocab.bos_id), ("eos", vocab.eod_id),
                        ("pad", vocab.text_pad_id)):
        if value is not None and not 0 <= value < vocab.text_size:
            raise CheckpointError(f"{where}: the {name} id {value} is outside the "
                                      f"vocabulary [0, {vocab.text_size})")


def check_source_shapes(src: Source) -> None:
    """Every tensor the import will read has the shape the architecture implies: refused in
    one line naming the tensor before anything is written (a wrong shape would otherwise fail
    deep inside a reshape, or, for the vocabulary tables, import silently)."""
    bias_shape = (src.model.hidden_size,)
    for (name, layer), shape in source_shapes(src.model, src.vocab.text_size).items():
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

def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    g, d, h = query_groups(m), head_dim(m), m.hidden_size
    per_group = m.num_attention_heads // g
    q = q.reshape(g, per_group * d, h)
    k, v = k.reshape(g, d, h), v.reshape(g, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def unpack_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, ...]:
    g, d, h = query_groups(m), head_dim(m), m.hidden_size
    per_group = m.num_attention_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, h)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def trainer_entries(m: ModelConfig, padded: int, dtype: torch.dtype) -> dict[str, Any]:
    """Every key a trainer checkpoint of this architecture holds (megatron-core's sharded
    state dict: model/keys.py), with its global shape; the linear layers' extra state."""
    keys = model_keys(m, padded)
    # layer-stacked tensors one layer per chunk, as the trainer writes them
    entries: dict[str, Any] = {
        k: TensorSpec(s, dtype, layer_chunks(s) if k in keys.stacked else None)
        for k, s in keys.shapes.items()}
    none = object_bytes(None)  # the local spec's linear layers carry no extra state
    entries.update({key: none for key in keys.objects})
    return entries


def role_of(keys: ModelKeys) -> dict[str, str]:
    """Checkpoint key -> its role (the names `Source.get` and model/keys.py share)."""
    return {key: role for role, key in keys.roles.items()}


def trainer_tensor(key: str, src: Source, padded: int, dtype: torch.dtype) -> torch.Tensor:
    """One trainer tensor built from the source (layers stacked)."""
    m = src.model
    role = role_of(model_keys(m, padded))[key]
    per_layer = {
        "attn_norm": lambda i: src.get("attn_norm", i),
        "attn_norm_bias": lambda i: _bias(src.get("attn_norm_bias", i), m),
        "qkv": lambda i: pack_qkv(src.get("q", i), src.get("k", i), src.get("v", i), m),
        "proj": lambda i: src.get("o", i),
        "mlp_norm": lambda i: src.get("mlp_norm", i),
        "mlp_norm_bias": lambda i: _bias(src.get("mlp_norm_bias", i), m),
        "fc1": lambda i: torch.cat([src.get("gate", i), src.get("up", i)]),
        "fc2": lambda i: src.get("down", i),
    }
    if role in per_layer:
        return torch.stack([per_layer[role](i).to(dtype) for i in range(m.num_layers)])
    if role in ("word_embeddings", "output_layer"):
        rows = src.get("embed" if role == "word_embeddings" else "lm_head")
        table = torch.zeros(padded, m.hidden_size, dtype=dtype)
        table[:rows.shape[0]] = rows.to(dtype)
        return table
    if role == "final_norm":
        return src.get("final_norm").to(dtype)
    if role == "final_norm_bias":
        return _bias(src.get("final_norm_bias"), m).to(dtype)
    raise KeyError(key)


def _bias(t: torch.Tensor | None, m: ModelConfig) -> torch.Tensor:
    return torch.zeros(m.hidden_size) if t is None else t


# ---- import ----------------------------------------------------------------------------------

def trainer_config(m: ModelConfig, vocab: VocabLayout, tp: int, pp: int,
                   divisible_by: int) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(m, make_vocab_size_divisible_by=divisible_by)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.data.text_vocab_size, cfg.data.image_vocab_size = vocab.text_size, 0
    return cfg


def import_checkpoint(src: Source, output: str | Path, tensor_parallel: int = 1,
                      pipeline_parallel: int = 1, divisible_by: int = 128,
                      dtype: torch.dtype = torch.float32, overwrite: bool = False
                      ) -> WriteStats:
    """Write `output` (a checkpoint root, iteration 0) from a pretrained LM."""
    check_parallel(src.model, tensor_parallel, pipeline_parallel, str(src.path))
    check_special_ids(src.vocab, str(src.path))
    check_source_shapes(src)
    layout = src.vocab
    padded = layout.padded_size(divisible_by, tensor_parallel)
    cfg = trainer_config(src.model, layout, tensor_parallel, pipeline_parallel, divisible_by)
    from megatron_t2i.training.checkpointing import OPTIM_METADATA

    meta = {"config": cfg.to_dict(), "vocab": layout.to_dict(), "padded_vocab_size": padded,
            "iteration": 0, "consumed_samples": 0,
            # no per-rank state (RNG, optimizer) was saved under any parallel layout
            "parallel": {}, "has_optimizer": False,
            "imported_from": {"format": src.format, "path": str(src.path),
                              # export restores the source's own special ids from it
                              "special_ids": source_special_ids(src)}}
    common = {"iteration": 0, "consumed_samples": 0, "content_metadata": dict(OPTIM_METADATA)}
    entries = trainer_entries(src.model, padded, dtype)
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
    return {"bos_token_id": src.vocab.bos_id, "eos_token_id": src.vocab.eod_id,
            "pad_token_id": src.vocab.text_pad_id}


def model_from_meta(meta: dict[str, Any]) -> ModelConfig:
    """The architecture a trainer checkpoint's meta.json describes."""
    m = meta["config"]["model"]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in m.items() if k in names})
