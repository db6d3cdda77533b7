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
from megatron_t2i.checkpoint.convert import ModelSpec
from megatron_t2i.checkpoint.io import (
    CheckpointReader,
    CheckpointToolError,
    WriteStats,
    staged_output,
)
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


def spec_from_hf_config(cfg: dict[str, Any], where: str) -> ModelSpec:
    def need(key: str) -> Any:
        if key not in cfg:
            raise CheckpointToolError(f"{where}: config.json has no {key!r}")
        return cfg[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    refuse = {
        "attention_bias": cfg.get("attention_bias", False),
        "mlp_bias": cfg.get("mlp_bias", False),
        "rope_scaling": cfg.get("rope_scaling"),
    }
    for key, value in refuse.items():
        if value:
            raise CheckpointToolError(f"{where}: {key}={value!r} is not supported (our GPT has "
                                      f"no linear biases and plain RoPE)")
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise CheckpointToolError(f"{where}: head_dim={cfg['head_dim']} differs from "
                                  f"hidden_size / num_attention_heads = {hidden // heads}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointToolError(f"{where}: hidden_act={cfg['hidden_act']!r}; only silu "
                                  f"(SwiGLU) is supported")
    theta = _rope_theta(cfg, where)
    if theta != int(theta):
        raise CheckpointToolError(f"{where}: rope_theta={theta} is not an integer")
    pad = cfg.get("pad_token_id")
    return ModelSpec(
        num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
        normalization="RMSNorm", norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rotary_base=int(theta), tied=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        bos_id=_token_id(cfg.get("bos_token_id"), 1), eod_id=_token_id(cfg.get("eos_token_id"), 2),
        pad_id=_token_id(pad, None))


def _rope_theta(cfg: dict[str, Any], where: str) -> float:
    """transformers >= 5 writes `rope_parameters`; older versions `rope_theta`."""
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise CheckpointToolError(f"{where}: rope_type={params['rope_type']!r} is not supported "
                                  f"(plain RoPE only)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _token_id(value: Any, default: int | None) -> int | None:
    if isinstance(value, list):  # Llama 3 lists several eos ids; the first is the document end
        value = value[0] if value else None
    return default if value is None else int(value)


class HFSource:
    """A Hugging Face Llama folder, read tensor by tensor."""

    format = "hf-llama"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise CheckpointToolError(f"{self.path}: no config.json (not a Hugging Face model "
                                      f"folder)")
        self.config = json.loads(config.read_text())
        arch = self.config.get("model_type")
        if arch not in ("llama", "mistral", None):
            raise CheckpointToolError(f"{config}: model_type {arch!r} is not Llama-family")
        self.spec = spec_from_hf_config(self.config, str(config))
        self._open: dict[Path, Any] = {}
        self._files = self._weight_files()

    def _weight_files(self) -> dict[str, Path]:
        """Tensor name -> file holding it."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {k: self.path / v for k, v in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            f = self.path / single
            if f.is_file():
                return {k: f for k in self._names_in(f)}
        raise CheckpointToolError(f"{self.path}: no model.safetensors, pytorch_model.bin or "
                                  f"index of shards")

    def _names_in(self, f: Path) -> list[str]:
        return list(self._handle(f).keys())

    def _handle(self, f: Path) -> Any:
        if f not in self._open:
            if not f.is_file():
                raise CheckpointToolError(f"{f}: shard listed in the index is missing")
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[f] = safe_open(str(f), framework="pt")
            else:
                self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return self._open[f]

    def get(self, name: str, layer: int | None = None) -> torch.Tensor | None:
        if name.endswith("_bias"):
            return None
        if name == "lm_head" and self.spec.tied:
            name = "embed"
        key = hf_name(name, layer)
        if key not in self._files:
            raise CheckpointToolError(f"{self.path}: tensor {key} is missing")
        handle = self._handle(self._files[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


# ---- export ----------------------------------------------------------------------------------

def hf_config(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups, "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_epsilon, "rope_theta": float(spec.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(spec.rotary_base)},
        "tie_word_embeddings": spec.tied, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": spec.bos_id, "eos_token_id": spec.eod_id, "pad_token_id": spec.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _check_exportable(meta: dict[str, Any], where: str) -> None:
    m = meta["config"]["model"]
    for key, want in (("normalization", "RMSNorm"), ("activation", "swiglu"),
                      ("position_embedding_type", "rope"), ("add_bias_linear", False)):
        if m.get(key) != want:
            raise CheckpointToolError(f"{where}: model.{key}={m.get(key)!r}; the Llama format "
                                      f"needs {want!r}")


def export_hf(checkpoint: str | Path, output: str | Path, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> WriteStats:
    """Write a Llama folder (config.json + one safetensors shard per trainer tensor + index).
    Rows past the layout's real ids (padding) are dropped."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = CheckpointReader(checkpoint)
    _check_exportable(reader.meta, str(reader.folder))
    spec = convert.spec_from_meta(reader.meta)
    size = VocabLayout.from_dict(reader.meta["vocab"]).size
    keys = [k for k in convert.trainer_entries(spec, 1, torch.float32)
            if "_extra_state" not in k]
    stats = WriteStats(tensors=0)
    start = time.perf_counter()
    with staged_output(output, overwrite, sources=(reader.folder,)) as tmp:
        weight_map: dict[str, str] = {}
        for i, key in enumerate(tqdm(keys, desc="export hf", leave=False, disable=None)):
            tensor = reader.read(key)
            out_dtype = dtype or tensor.dtype
            named = _split(key, tensor, spec, size)
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
            hf_config(spec, dtype or reader.spec(convert.EMBED).dtype), indent=2))
        stats.bytes = sum(p.stat().st_size for p in tmp.iterdir())
    stats.seconds = time.perf_counter() - start
    return stats


def _split(key: str, tensor: torch.Tensor, spec: ModelSpec, size: int) -> dict[str, torch.Tensor]:
    """One trainer tensor -> the HF tensors it holds."""
    if key == convert.EMBED:
        return {hf_name("embed", None): tensor[:size]}
    if key == convert.OUTPUT:
        return {hf_name("lm_head", None): tensor[:size]}
    if key == convert.FINAL + "weight":
        return {hf_name("final_norm", None): tensor}
    out = {}
    for layer in range(spec.num_layers):
        t = tensor[layer]
        if key == convert.QKV + "weight":
            for name, part in zip("qkv", convert.unpack_qkv(t, spec)):
                out[hf_name(name, layer)] = part
        elif key == convert.FC1 + "weight":
            gate, up = t.chunk(2)
            out[hf_name("gate", layer)], out[hf_name("up", layer)] = gate, up
        else:
            name = {convert.QKV + "layer_norm_weight": "attn_norm",
                    convert.PROJ + "weight": "o", convert.FC1 + "layer_norm_weight": "mlp_norm",
                    convert.FC2 + "weight": "down"}[key]
            out[hf_name(name, layer)] = t
    return out
