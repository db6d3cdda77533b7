"""Core attention through PyTorch's scaled_dot_product_attention.

megatron-core's local `DotProductAttention` materialises the [b, np, sq, sk] score matrix;
SDPA dispatches to flash / memory-efficient kernels on GPU and a fused kernel on CPU. This
module takes the place of `core_attention` in the local layer spec, with the same constructor
and forward signature.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor a bias")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, heads, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        # megatron masks are True where attention is NOT allowed; SDPA's bool mask is the reverse
        mask = None if attention_mask is None or causal else ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)  # [sq, b, hp]

