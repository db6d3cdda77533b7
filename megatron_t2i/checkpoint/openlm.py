"""OpenLM (mlfoundations/open_lm) checkpoints: the paper's likely base, OpenLM-1B.

An OpenLM checkpoint is a torch file `{"state_dict": {...}, "epoch": ..., ...}` (keys possibly
prefixed by `module.` from DDP or `_orig_mod.` from torch.compile), loaded here with
weights_only=True. Its parameter names:

    tok_embeddings.weight                    [vocab, dim]
    layers.{i}.attention_norm.weight (.bias) pre-attention norm
    layers.{i}.attention.in_proj.weight      [3 x dim, dim] = [q; k; v], every head its own kv
    layers.{i}.attention.out_proj.weight     [dim, dim]
    layers.{i}.ffn_norm.weight (.bias)       pre-MLP norm
    layers.{i}.feed_forward.w12.weight       [2 x ffn, dim] = [gate; up]  (xformers SwiGLU)
    layers.{i}.feed_forward.w3.weight        [dim, ffn]
    norm.weight (.bias), output.weight

The head count is not in the state dict: it comes from the model config JSON open_lm trains
with (`n_heads`, also `norm_eps`, `seq_len`, `weight_tying`) or the command line. Its default
`rotary` position embedding is rotate-half with base 10000, as megatron-core's RoPE. The norm is
OpenLM's default LayerNorm without bias (`gain_only_lp_layer_norm`) unless `rms_norm` is given.
`apply_qk_norm` and `post_embed_norm` models are refused (our GPT has neither).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_t2i.checkpoint import convert
from megatron_t2i.checkpoint.io import reason
from megatron_t2i.checkpoint.layout import CheckpointError
from megatron_t2i.config import ModelConfig

_PER_LAYER = {"attn_norm": "attention_norm.weight", "attn_norm_bias": "attention_norm.bias",
              "o": "attention.out_proj.weight", "mlp_norm": "ffn_norm.weight",
              "mlp_norm_bias": "ffn_norm.bias", "down": "feed_forward.w3.weight"}
_GLOBAL = {"embed": "tok_embeddings.weight", "final_norm": "norm.weight",
           "final_norm_bias": "norm.bias", "lm_head": "output.weight"}


class OpenLMSource:
    """An OpenLM checkpoint file plus its model config."""

    format = "openlm"

    def __init__(self, path: str | Path, model_config: str | Path | dict[str, Any] | None = None,
                 num_attention_heads: int | None = None, norm: str = "layer_norm",
                 bos_id: int = 0, eod_id: int = 0, pad_id: int | None = None) -> None:
        self.path = Path(path)
        self.state = _load_state_dict(self.path)
        cfg = _model_config(model_config)
        if cfg.get("apply_qk_norm") or any(".attention.q_norm." in k for k in self.state):
            raise CheckpointError(f"{self.path}: apply_qk_norm models are not supported")
        if cfg.get("post_embed_norm") or any(k.startswith("post_embed_norm.") for k in self.state):
            raise CheckpointError(f"{self.path}: post_embed_norm models are not supported")
        heads = num_attention_heads or cfg.get("n_heads")
        if not heads:
            raise CheckpointError(f"{self.path}: the number of attention heads is not in "
                                      f"the state dict; give the model config (n_heads) or "
                                      f"--num-attention-heads")
        if norm not in ("layer_norm", "rms_norm"):
            raise CheckpointError(f"OpenLM norm {norm!r}: expected layer_norm or rms_norm")
        self.model = self._model(int(heads), cfg, norm)
        self.vocab = convert.text_vocab(self._tensor("tok_embeddings.weight").shape[0], bos_id,
                                        eod_id, pad_id, str(self.path))

    def _model(self, heads: int, cfg: dict[str, Any], norm: str) -> ModelConfig:
        embed = self._tensor("tok_embeddings.weight")
        layers = {int(k.split(".")[1]) for k in self.state if k.startswith("layers.")}
        if not layers or sorted(layers) != list(range(len(layers))):
            raise CheckpointError(f"{self.path}: no consecutive layers.N.* parameters")
        w12 = self._tensor("layers.0.feed_forward.w12.weight")
        tied = bool(cfg.get("weight_tying", False)) or "output.weight" not in self.state
        return convert.llama_model(
            num_layers=len(layers), hidden_size=embed.shape[1], num_attention_heads=heads,
            num_query_groups=heads, ffn_hidden_size=w12.shape[0] // 2,
            normalization="LayerNorm" if norm == "layer_norm" else "RMSNorm",
            norm_epsilon=float(cfg.get("norm_eps", 1e-5)), rotary_base=10000, tied=tied,
            max_position_embeddings=int(cfg.get("seq_len", 2048)))

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.path}: parameter {key} is missing")
        return self.state[key]

    def get(self, name: str, layer: int | None = None) -> torch.Tensor | None:
        if layer is None:
            if name == "lm_head" and convert.is_tied(self.model):
                name = "embed"
            key = _GLOBAL[name]
            return self.state.get(key) if name.endswith("_bias") else self._tensor(key)
        prefix = f"layers.{layer}."
        if name in ("q", "k", "v"):
            q, k, v = self._tensor(prefix + "attention.in_proj.weight").chunk(3)
            return {"q": q, "k": k, "v": v}[name]
        if name in ("gate", "up"):
            gate, up = self._tensor(prefix + "feed_forward.w12.weight").chunk(2)
            return gate if name == "gate" else up
        key = prefix + _PER_LAYER[name]
        return self.state.get(key) if name.endswith("_bias") else self._tensor(key)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such OpenLM checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable OpenLM checkpoint ({reason(e)})"
                                  ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(str(k).endswith("tok_embeddings.weight")
                                               for k in state):
        raise CheckpointError(f"{path}: not an OpenLM checkpoint (no tok_embeddings.weight "
                                  f"in its state_dict)")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _model_config(model_config: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    if model_config is None or isinstance(model_config, dict):
        return dict(model_config or {})
    path = Path(model_config)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the OpenLM model config ({e})") from None
