"""Hugging Face Llama-family checkpoints: read (import) and write (export).

A folder with `config.json` and `model.safetensors` (or `model-*.safetensors` with an index),
or `pytorch_model*.bin` (loaded with torch.load(weights_only=True, mmap=True)). Tensors are
read one at a time. What our GPT cannot express is refused by name: biases, rope scaling,
a head_dim other than hidden / heads, activations other than SiLU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from megatron_t2i.checkpoint import convert
from megatron_t2i.checkpoint.integrity import write_manifest
from megatron_t2i.checkpoint.io import CheckpointReader, WriteStats, reason
from megatron_t2i.checkpoint.layout import CheckpointError, staged_output
from megatron_t2i.config import ModelConfig
from megatron_t2i.model.keys import model_keys
from megatron_t2i.vocab import VocabLayout

_PER_LAYER = {
    "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}
_GLOBAL = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "lm_head": "lm_head.weight"}


def hf_name(name: str, layer: int | None) -> str:
    return _GLOBAL[name] if layer is None else f"model.layers.{layer}.{_PER_LAYER[name]}"


# Keys that change the function of a Llama-family model when set to anything but the value
# given here (None: absent or null). Our GPT implements none of them, so each is refused.
_PLAIN = {
    "attention_bias": False, "mlp_bias": False, "partial_rotary_factor": 1.0,
    "use_sliding_window": False, "qk_layernorm": False, "use_qk_norm": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "attention_multiplier": None,
    "logits_scaling": 1.0, "query_pre_attn_scalar": None, "no_rope_layers": None,
}


def model_from_hf_config(cfg: dict[str, Any], where: str) -> ModelConfig:
    """The architecture a Llama / Mistral `config.json` describes; anything our GPT would
    compute differently from transformers is refused by name (one line)."""
    def need(key: str) -> Any:
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise CheckpointError(f"{where}: config.json needs a positive integer {key!r}, "
                                      f"found {cfg.get(key)!r}")
        return cfg[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    _refuse_unsupported(cfg, where)
    if hidden % heads:
        raise CheckpointError(f"{where}: hidden_size={hidden} is not divisible by "
                                  f"num_attention_heads={heads}")
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"{where}: head_dim={cfg['head_dim']} differs from "
                                  f"hidden_size / num_attention_heads = {hidden // heads}")
    groups = cfg.get("num_key_value_heads") or heads
    if heads % groups:
        raise CheckpointError(f"{where}: num_attention_heads={heads} is not a multiple of "
                                  f"num_key_value_heads={groups}")
    theta = _rope_theta(cfg, where)
    if theta != int(theta):
        raise CheckpointError(f"{where}: rope_theta={theta} is not an integer")
    return convert.llama_model(
        num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, ffn_hidden_size=need("intermediate_size"),
        normalization="RMSNorm", norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rotary_base=int(theta), tied=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048))


def vocab_from_hf_config(cfg: dict[str, Any], where: str) -> VocabLayout:
    """The source's text ids and specials (`need`ed to be valid by model_from_hf_config)."""
    vocab = cfg["vocab_size"]
    return convert.text_vocab(vocab, _token_id(cfg, "bos_token_id", 1, vocab, where),
                              _token_id(cfg, "eos_token_id", 2, vocab, where),
                              _token_id(cfg, "pad_token_id", None, vocab, where), where)


def _refuse_unsupported(cfg: dict[str, Any], where: str) -> None:
    for key, plain in _PLAIN.items():
        if cfg.get(key) not in (None, plain):
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} is not supported (our GPT "
                                      f"computes it as {key}={plain!r}; importing would give "
                                      f"a different model)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={cfg['hidden_act']!r}; only silu "
                                  f"(SwiGLU) is supported")
    window = cfg.get("sliding_window")
    if window is not None and window < cfg.get("max_position_embeddings", 2048):
        raise CheckpointError(
            f"{where}: sliding_window={window} is not supported (our attention is full causal "
            f"attention: positions from {window} on would differ)")
    full = [t for t in cfg.get("layer_types") or [] if t != "full_attention"]
    if full:
        raise CheckpointError(f"{where}: layer_types has {full[0]!r} layers; only "
                                  f"full_attention is supported")


def _rope_theta(cfg: dict[str, Any], where: str) -> float:
    """RoPE's base, from any layout transformers accepts: `rope_parameters` (transformers >=
    5) or `rope_scaling` (older), each with `rope_type` or the legacy `type`. Any scaling
    (linear, dynamic, yarn, llama3, longrope, ...) is refused: our RoPE is plain."""
    theta = cfg.get("rope_theta")
    for layout in ("rope_parameters", "rope_scaling"):
        params = cfg.get(layout)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise CheckpointError(f"{where}: {layout}={params!r} is not a JSON object")
        for key in ("rope_type", "type"):
            if params.get(key, "default") != "default":
                raise CheckpointError(
                    f"{where}: {layout}.{key}={params[key]!r} is not supported (plain RoPE "
                    f"only; this scaling would change the logits)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{where}: {layout}.partial_rotary_factor="
                                      f"{params['partial_rotary_factor']} is not supported")
        theta = params.get("rope_theta", theta)
    theta = 10000.0 if theta is None else theta
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"{where}: rope_theta={theta!r} is not a positive number")
    return float(theta)


def _token_id(cfg: dict[str, Any], key: str, default: int | None, vocab: int,
              where: str) -> int | None:
    """A special id checked against the vocabulary; Llama 3 lists several eos ids (all are
    checked, the first is the document end)."""
    value = cfg.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab:
            raise CheckpointError(f"{where}: {key}={value!r} is outside the vocabulary "
                                      f"[0, {vocab})")
    return values[0] if values else default


class HFSource:
    """A Hugging Face Llama folder, read tensor by tensor; every tensor's name and shape is
    checked against config.json when the folder is opened, before anything is written."""

    format = "hf-llama"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a Hugging Face model "
                                      f"folder)")
        self.config = _read_json(config)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config}: not a JSON object")
        arch = self.config.get("model_type")
        if arch not in ("llama", "mistral", None):
            raise CheckpointError(f"{config}: model_type {arch!r} is not Llama-family")
        self.model = model_from_hf_config(self.config, str(config))
        self.vocab = vocab_from_hf_config(self.config, str(config))
        self._open: dict[Path, Any] = {}
        self._files = self._weight_files()
        self._check_tensors()

    def _weight_files(self) -> dict[str, Path]:
        """Tensor name -> file holding it."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index}: no 'weight_map' object")
                return {k: self.path / v for k, v in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            f = self.path / single
            if f.is_file():
                return {k: f for k in self._names_in(f)}
        raise CheckpointError(f"{self.path}: no model.safetensors, pytorch_model.bin or "
                                  f"index of shards")

    def _check_tensors(self) -> None:
        """Every tensor the model needs is there with the shape config.json implies, and no
        tensor is left over that the model would use (a bias, a rotary table aside)."""
        wanted = {hf_name(name, layer): shape
                  for (name, layer), shape in convert.source_shapes(
                      self.model, self.vocab.text_size).items()
                  if not (name == "lm_head" and convert.is_tied(self.model))}
        for key, shape in wanted.items():
            if key not in self._files:
                raise CheckpointError(f"{self.path}: tensor {key} is missing")
            got = self._shape(key)
            if got != shape:
                raise CheckpointError(f"{self._files[key]}: tensor {key} is "
                                          f"{list(got)}, config.json implies {list(shape)}")
        extra = [k for k in self._files if k not in wanted and not _ignorable(k, self.model)]
        if extra:
            raise CheckpointError(f"{self._files[extra[0]]}: tensor {extra[0]} (and "
                                      f"{len(extra) - 1} more) is not part of a plain Llama "
                                      f"model; importing without it would change the model")

    def shape(self, name: str, layer: int | None = None) -> tuple[int, ...]:
        """A tensor's shape from the file's header, without reading its data."""
        if name == "lm_head" and convert.is_tied(self.model):
            name = "embed"
        return self._shape(hf_name(name, layer))

    def _shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self._files[key])
        if hasattr(handle, "get_slice"):
            return tuple(handle.get_slice(key).get_shape())
        if key not in handle:
            raise CheckpointError(f"{self._files[key]}: tensor {key} listed in the index "
                                      f"is not in the file")
        return tuple(handle[key].shape)

    def _names_in(self, f: Path) -> list[str]:
        return list(self._handle(f).keys())

    def _handle(self, f: Path) -> Any:
        if f not in self._open:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            self._open[f] = _open_weights(f)
        return self._open[f]

    def get(self, name: str, layer: int | None = None) -> torch.Tensor | None:
        if name.endswith("_bias"):
            return None
        if name == "lm_head" and convert.is_tied(self.model):
            name = "embed"
        key = hf_name(name, layer)
        if key not in self._files:
            raise CheckpointError(f"{self.path}: tensor {key} is missing")
        handle = self._handle(self._files[key])
        try:
            return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]
        except Exception as e:  # bytes past a truncated end, a corrupt header
            raise CheckpointError(f"{self._files[key]}: tensor {key} cannot be read "
                                      f"({reason(e)})") from None


def _ignorable(key: str, model: ModelConfig) -> bool:
    """Tensors transformers itself ignores: a tied model's saved lm_head, old rotary tables."""
    return key.endswith("rotary_emb.inv_freq") or (convert.is_tied(model)
                                                   and key == hf_name("lm_head", None))


def _open_weights(f: Path) -> Any:
    """A safetensors handle, or a .bin state dict loaded with weights_only=True (a pickle
    that would run code is refused in one line)."""
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            return safe_open(str(f), framework="pt")
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{f}: not a readable weights file ({reason(e)})"
                                  ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: holds a {type(state).__name__}, not a state dict")
    return state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---- export ----------------------------------------------------------------------------------

def hf_config(m: ModelConfig, dtype: torch.dtype, vocab: dict[str, Any]) -> dict[str, Any]:
    """A Llama config.json; `vocab` (export_vocab) gives the size and the special ids."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.resolved_ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": convert.query_groups(m), "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "rms_norm_eps": m.norm_epsilon, "rope_theta": float(m.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "tie_word_embeddings": convert.is_tied(m), "attention_bias": False, "mlp_bias": False,
        "head_dim": convert.head_dim(m), "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."), **vocab,
    }


def export_vocab(meta: dict[str, Any]) -> dict[str, Any]:
    """vocab_size and the special ids of the exported model: the inverse of the import.

    A `<pad>` the import (or surgery) appended because the source had no pad id is the last
    real row; it is dropped again (it is never a training target, and as an output row it
    would take probability mass). The text ids keep the source's own special ids, spelled as
    the source spelled them; ids added by surgery (image codes, <boi>, <eoi>) are named.
    """
    layout = VocabLayout.from_dict(meta["vocab"])
    size = layout.size
    drop_pad = layout.text_pad_id is None and layout.added_specials[-1] == "<pad>"
    if drop_pad:
        size -= 1
    source = (meta.get("imported_from") or {}).get("special_ids") or {}
    out: dict[str, Any] = {
        "vocab_size": size,
        "bos_token_id": source.get("bos_token_id", layout.bos_id),
        "eos_token_id": source.get("eos_token_id", layout.eod_id),
        "pad_token_id": None if drop_pad else layout.pad_id}
    if layout.text_pad_id is not None and "pad_token_id" in source:
        out["pad_token_id"] = source["pad_token_id"]
    if layout.image_size:
        out["image_token_range"] = [layout.image_start, layout.image_start + layout.image_size]
    specials = {name: layout.special_id(name) for name in layout.added_specials
                if layout.special_id(name) < size}
    if specials:
        out["added_special_token_ids"] = specials
    return out


def _check_exportable(meta: dict[str, Any], where: str) -> None:
    m = meta["config"]["model"]
    for key, want in (("normalization", "RMSNorm"), ("activation", "swiglu"),
                      ("position_embedding_type", "rope"), ("add_bias_linear", False)):
        if m.get(key) != want:
            raise CheckpointError(f"{where}: model.{key}={m.get(key)!r}; the Llama format "
                                      f"needs {want!r}")


def export_hf(checkpoint: str | Path, output: str | Path, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> WriteStats:
    """Write a Llama folder (config.json + one safetensors shard per trainer tensor + index).
    Rows past the layout's real ids (padding, and an added <pad>: export_vocab) are dropped."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = CheckpointReader(checkpoint)
    _check_exportable(reader.meta, str(reader.folder))
    model = convert.model_from_meta(reader.meta)
    vocab = export_vocab(reader.meta)
    size = vocab["vocab_size"]
    names = model_keys(model)
    roles = convert.role_of(names)
    keys = list(roles)
    stats = WriteStats(tensors=0)
    start = time.perf_counter()
    with staged_output(output, overwrite, sources=(reader.folder,)) as tmp:
        weight_map: dict[str, str] = {}
        for i, key in enumerate(tqdm(keys, desc="export hf", leave=False, disable=None)):
            tensor = reader.read(key)
            out_dtype = dtype or tensor.dtype
            named = _split(roles[key], tensor, model, size)
            shard = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
            save_file({k: v.to(out_dtype).clone() for k, v in named.items()},
                      str(tmp / shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in named})
            stats.tensors += len(named)
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
        (tmp / "config.json").write_text(json.dumps(
            hf_config(model, dtype or reader.spec(names.key("word_embeddings")).dtype, vocab), indent=2))
        write_manifest(tmp)
        stats.bytes = sum(p.stat().st_size for p in tmp.iterdir())
    stats.seconds = time.perf_counter() - start
    return stats


_LAYER_NAMES = {"attn_norm": "attn_norm", "proj": "o", "mlp_norm": "mlp_norm", "fc2": "down"}


def _split(role: str, tensor: torch.Tensor, m: ModelConfig,
           size: int) -> dict[str, torch.Tensor]:
    """One trainer tensor (by its role, model/keys.py) -> the HF tensors it holds."""
    if role == "word_embeddings":
        return {hf_name("embed", None): tensor[:size]}
    if role == "output_layer":
        return {hf_name("lm_head", None): tensor[:size]}
    if role == "final_norm":
        return {hf_name("final_norm", None): tensor}
    out = {}
    for layer in range(m.num_layers):
        t = tensor[layer]
        if role == "qkv":
            for name, part in zip("qkv", convert.unpack_qkv(t, m)):
                out[hf_name(name, layer)] = part
        elif role == "fc1":
            gate, up = t.chunk(2)
            out[hf_name("gate", layer)], out[hf_name("up", layer)] = gate, up
        else:
            out[hf_name(_LAYER_NAMES[role], layer)] = t
    return out
